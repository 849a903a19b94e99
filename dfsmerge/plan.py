"""Recipe + source configs -> a checked plan: the output config and one task per output tensor.

Validation happens here, against the sources' ``config.json`` only, before any weight is read. Two layouts are
planned here and nowhere else.

The flat layout (:func:`make_plan`): the folding rules of ``dfs-semantics.md`` ("Folding into a standard model"):

- ``embed_tokens``          <- ``T_0`` applied to every row (``E S_0^T + b_0``)
- hop ``k``'s ``down_proj`` <- ``S_{k+1} W_down``, bias ``S_{k+1} b_down + b_{k+1}``
- hop ``k``                 -> its own physical layer ``model.layers.k``

The compact layout (:func:`compact_plan`): each used source layer stored once (``model.dfs_layers.{u}.*``), the
hop table in ``config.json`` and the per-hop transforms as tensors (``model.dfs_transforms.{k}.scale`` /
``.bias``), run by ``modeling_dfs.py``. It is also the config of the in-memory model that ``assemble`` builds.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from .families import FAMILIES, SHAPE_KEYS, Family, family_of
from .recipe import IDENTITY, Recipe, RecipeError, Transform, brief

if TYPE_CHECKING:
    import torch

__all__ = ["TensorTask", "Plan", "make_plan", "compact_plan", "is_classifier", "DTYPE_BYTES", "dtype_name",
           "torch_dtype", "effective_config", "check_device", "STORED_LAYER", "HOP_TRANSFORM",
           "compact_transforms", "hop_table"]

STORED_LAYER = "model.dfs_layers.{u}."  # compact layout: stored layer u's tensors
HOP_TRANSFORM = "model.dfs_transforms.{k}."  # compact layout: hop k's ``scale`` / ``bias``

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}  # the output dtypes, by name, and their item sizes
_CHUNK_ELEMENTS = 1 << 22  # rows are transformed in chunks of about 16 MB of float32


def dtype_name(value: str | torch.dtype) -> str:
    """The name of an output dtype (a key of :data:`DTYPE_BYTES`) from any of its spellings: ``"float32"``,
    ``"torch.float32"`` or ``torch.float32``. Raises ``RecipeError`` naming ``dtype`` for anything else."""
    name = str(value).removeprefix("torch.") if isinstance(value, str) or _is_torch_dtype(value) else None
    if name not in DTYPE_BYTES:
        raise RecipeError(f"dtype: expected bfloat16, float16 or float32 (or torch.float32 etc.), got {value!r:.60}")
    return name


def _is_torch_dtype(value: object) -> bool:
    torch = sys.modules.get("torch")  # not imported: nothing is a torch dtype (as recipe.is_tensor)
    return torch is not None and isinstance(value, torch.dtype)


def torch_dtype(value: str | torch.dtype) -> torch.dtype:
    """The torch dtype of an output dtype given in any spelling :func:`dtype_name` accepts."""
    import torch

    return getattr(torch, dtype_name(value))


def check_device(device: str | torch.device) -> str:
    """A device the folding math can run on (``cpu``, ``cuda``, ``cuda:N``, ``mps``) and that this machine has;
    checked before any weight is read. Returns it as a string; raises ``RecipeError`` naming ``device``."""
    if device == "cpu":
        return device  # every machine has it: no need to import torch to say so
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise RecipeError(f"device: expected cpu, cuda, cuda:N or mps, got {brief(device)}")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count or (parsed.index or 0) >= count:
            build = ", a torch built without CUDA" if torch.version.cuda is None else ""
            raise RecipeError(f"device: {brief(device)} is not on this machine, which has {count} CUDA "
                              f"device(s){build}; use --device cpu")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise RecipeError(f"device: {brief(device)} is not on this machine, which has no usable Apple GPU")
    return str(parsed)


@dataclass(frozen=True)
class TensorTask:
    """How one output tensor is made: read ``src_name`` of source ``model`` and fold ``transform`` in.

    ``fold`` is ``"copy"`` (as is), ``"rows"`` (``T`` on each row, bias included: embeddings), ``"down"``
    (``S W``: a down projection's weight), ``"down_bias"`` (``S b + b_T``; ``src_name`` may be None for a
    source without bias), ``"zeros"``, or ``"scale"`` / ``"bias"`` (``transform``'s own ``S`` or ``b``, which the
    compact format stores; no source is read).
    """

    name: str
    shape: tuple[int, ...]
    model: int
    src_name: str | None
    fold: str = "copy"
    transform: Transform = IDENTITY

    @property
    def copies(self) -> bool:
        """Whether the output tensor is the source tensor unchanged (no fold)."""
        return self.fold == "copy" or (self.fold in ("rows", "down") and self.transform.is_identity)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def chunks(self, get: Callable[[int, str], torch.Tensor], device: str = "cpu",
               dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
        """The output tensor in consecutive row chunks (float32 where folded, the source dtype where copied).

        A scalar ``S W`` whose source is already in the output ``dtype`` is computed in that dtype: ATen
        multiplies bfloat16/float16 in float32 and rounds once, so the result is bit-identical to the float32
        fold rounded afterwards, at a quarter of the work."""
        import torch

        if self.fold in ("scale", "bias"):
            yield torch.as_tensor(getattr(self.transform, self.fold), dtype=torch.float32).reshape(self.shape)
            return
        if self.fold == "zeros" or (self.fold == "down_bias" and self.src_name is None):
            source = torch.zeros(self.shape, dtype=torch.float32)
        else:
            source = get(self.model, self.src_name)
            if tuple(source.shape) != self.shape:
                raise RecipeError(f"models[{self.model}]: tensor {self.src_name!r} has shape "
                                  f"{tuple(source.shape)}, the config says {self.shape}")
        if self.copies:
            yield source
            return
        if self.fold in ("down_bias", "zeros"):
            yield self.transform.apply(source.to(device, torch.float32)) if self.fold == "down_bias" else source
            return
        matrix = self.fold == "down" and self.transform.kind == "matrix"
        full = source.to(device, torch.float32) if matrix else None  # S W mixes rows: needs all of W
        rows = max(1, _CHUNK_ELEMENTS // max(1, self.numel // self.shape[0]))
        for r in range(0, self.shape[0], rows):
            if self.fold == "rows":
                yield self.transform.apply(source[r:r + rows].to(device, torch.float32))
            elif matrix:
                yield self.transform.scale[r:r + rows].to(device) @ full
            else:  # scalar or diagonal S: row i of W times s_i
                scale = self.transform.scale
                if isinstance(scale, float) and source.dtype == dtype:
                    yield source[r:r + rows].to(device) * scale
                    continue
                factor = scale if isinstance(scale, float) else scale[r:r + rows, None].to(device)
                yield source[r:r + rows].to(device, torch.float32, copy=True).mul_(factor)  # one buffer, not two


@dataclass
class Plan:
    """Everything the writer needs: the output config and the ordered tensor tasks."""

    recipe: Recipe
    family: Family
    configs: list[dict]
    config: dict  # the output config.json
    tasks: list[TensorTask]
    classification: bool

    def num_params(self) -> int:
        return sum(t.numel for t in self.tasks)

    def nbytes(self, dtype: str = "bfloat16") -> int:
        return self.num_params() * DTYPE_BYTES[dtype_name(dtype)]

    def compact_params(self) -> int:
        """Parameters of the same recipe in the compact format (each used source layer stored once)."""
        return compact_plan(self.recipe, self.configs).num_params()


def _validate(recipe: Recipe, configs: list[dict]) -> Family:
    families = [family_of(c, f"models[{i}] ({recipe.sources[i]})") for i, c in enumerate(configs)]
    for i, fam in enumerate(families[1:], 1):
        if fam is not families[0]:
            raise RecipeError(f"models[{i}]: model_type {fam.model_type!r} differs from models[0] "
                              f"({families[0].model_type!r}); all sources must be one family")
    _check_same_layers(recipe, configs, families[0])
    _check_layers(recipe, configs)
    hidden = configs[0]["hidden_size"]
    for k, hop in enumerate(recipe.hops):
        width = hop.transform.width()
        if width is not None and width != hidden:
            raise RecipeError(f"{hop.where}: transform of length {width}, expected hidden_size {hidden}")
    vin, vout = configs[recipe.input_model]["vocab_size"], configs[recipe.output_model]["vocab_size"]
    if vin != vout:
        raise RecipeError(f"input_layer_model/output_layer_model: vocabulary sizes differ ({vin} vs {vout}); "
                          "the embeddings and the head must share one vocabulary")
    return families[0]


def _check_same_layers(recipe: Recipe, configs: list[dict], family: Family) -> None:
    """Refuse sources whose decoder layers are not interchangeable: they must agree on every ``SHAPE_KEYS``
    setting by its effective value (:func:`effective_config`), so that checkpoints written by different
    transformers versions (``rope_theta`` vs ``rope_parameters``, ``head_dim`` or ``mlp_bias`` left out for their
    defaults) are one architecture. Raw values are compared first; config classes are consulted only when they
    differ, or when the family derives settings from keys outside ``SHAPE_KEYS`` (Qwen2's
    ``use_sliding_window``)."""
    raw = [{key: c.get(key) for key in SHAPE_KEYS} for c in configs]
    if not family.per_layer_keys and all(r == raw[0] for r in raw):
        return
    settings = [effective_config(c, family, f"models[{i}] ({recipe.sources[i]})") for i, c in enumerate(configs)]
    for i, values in enumerate(settings[1:], 1):
        for key in SHAPE_KEYS:
            if values[key] != settings[0][key]:
                raise RecipeError(f"models[{i}]: {key} = {values[key]!r:.200} differs from models[0] "
                                  f"({settings[0][key]!r:.200}); the layers of all sources must be interchangeable")


def effective_config(config: dict, family: Family, where: str = "config.json") -> dict:
    """The values of ``SHAPE_KEYS`` and of the family's per-layer keys as transformers' config class of the family
    reads ``config`` (a ``config.json`` mapping): defaults filled in, old spellings normalised (transformers 5
    folds a 4.x top-level ``rope_theta`` / ``rope_scaling`` into ``rope_parameters``), per-layer settings derived (Qwen2's
    ``layer_types`` from ``use_sliding_window`` and ``max_window_layers``), ``sliding_window`` None where no layer
    slides. ``head_dim`` is ``hidden_size // num_attention_heads`` where the class has none (what its attention
    uses). Keys the class does not know are None.

    Imports only the family's configuration module (``transformers.models.<type>.configuration_<type>``), on the
    first call. Raises ``RecipeError`` naming ``where`` when the class refuses the config."""
    module = importlib.import_module(f"transformers.models.{family.model_type}.configuration_{family.model_type}")
    config_class = getattr(module, family.causal_lm.removesuffix("ForCausalLM") + "Config")
    try:
        parsed = config_class(**config)
    except Exception as exc:  # transformers raises several types (strict dataclass validation, ValueError)
        reason = " ".join(str(exc).split())
        raise RecipeError(f"{where}: config.json is not a valid {config_class.__name__}: {reason:.300}") from None
    values = {key: getattr(parsed, key, None) for key in (*SHAPE_KEYS, *family.per_layer_keys)}
    values["head_dim"] = values["head_dim"] or parsed.hidden_size // parsed.num_attention_heads
    for key in ("rope_parameters", "rope_scaling"):  # a 4.x rope_scaling's "type" stays beside its "rope_type"
        rope = values[key]
        if isinstance(rope, dict) and "rope_type" in rope:
            values[key] = {k: v for k, v in rope.items() if k != "type"}
    return values


def _check_layers(recipe: Recipe, configs: list[dict]) -> None:
    counts = [c["num_hidden_layers"] for c in configs]
    mask = recipe.raw.get("layer_mask") if recipe.raw else None
    if mask is not None:
        width = len(mask[0][0])
        for i, n in enumerate(counts):
            if n != width:
                raise RecipeError(f"layer_mask: expected shape ({len(mask)}, {len(configs)}, {n}), got "
                                  f"({len(mask)}, {len(configs)}, {width}) (models[{i}] has {n} layers)")
    for hop in recipe.hops:
        if hop.layer >= counts[hop.model]:
            raise RecipeError(f"{hop.where}: layer {hop.layer} of models[{hop.model}], which has "
                              f"{counts[hop.model]} layers (0..{counts[hop.model] - 1})")


def is_classifier(config: dict) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _checked(recipe: Recipe, configs: list[dict], dtype: str) -> tuple[Family, bool]:
    """The sources' family and whether the output is a sequence classifier, after validating everything that
    both layouts need."""
    family = _validate(recipe, configs)
    out_cfg = configs[recipe.output_model]
    classification = is_classifier(out_cfg) if recipe.classification is None else recipe.classification
    if classification and not is_classifier(out_cfg):
        raise RecipeError(f"classification: models[{recipe.output_model}] (output_layer_model) is not a "
                          "*ForSequenceClassification model, so it has no score head")
    return family, classification


def _biased_family(family: Family, configs: list[dict]) -> tuple[Family, list[dict]]:
    """The family (and configs) a flat output with a ``down_proj`` bias is written as: the sources' own when it
    has an MLP bias, else the family its layers are without a sliding window (Mistral -> Llama with ``mlp_bias``,
    ``Family.biased_as``)."""
    if family.mlp_bias_key is not None:
        return family, configs
    windowed = [i for i, c in enumerate(configs) if c.get("sliding_window", family.default_window) is not None]
    if family.biased_as is None or windowed:
        why = (f"models[{windowed[0]}] has an active sliding window, which {family.biased_as} layers lack"
               if family.biased_as and windowed else f"a {family.model_type} model has no MLP bias")
        raise RecipeError(f"bias_factors: {why}, so a bias cannot be folded into a flat model; use scales only, "
                          "or --format compact (which runs biases as they are)")
    target = FAMILIES[family.biased_as]
    return target, [{**{k: v for k, v in c.items() if k != "sliding_window"}, "model_type": target.model_type}
                    for c in configs]


def make_plan(recipe: Recipe, configs: list[dict], dtype: str | torch.dtype = "bfloat16") -> Plan:
    """Validate ``recipe`` against the source configs and plan every output tensor of the flat layout.

    Raises ``RecipeError`` naming the recipe field for anything the sources cannot do."""
    dtype = dtype_name(dtype)
    family, classification = _checked(recipe, configs, dtype)
    hops = recipe.hops
    biased = any(h.transform.has_bias for h in hops[1:])
    if biased:
        family, configs = _biased_family(family, configs)
    out_cfg = configs[recipe.output_model]
    t0 = hops[0].transform
    tied = bool(out_cfg.get("tie_word_embeddings", False)) and not classification
    keep_tied = tied and recipe.input_model == recipe.output_model and t0.is_identity

    hidden, vocab = out_cfg["hidden_size"], out_cfg["vocab_size"]
    tasks = [TensorTask(family.embed, (vocab, hidden), recipe.input_model, family.embed, "rows", t0)]
    for k, hop in enumerate(hops):
        src_cfg = configs[hop.model]
        prefix_out = family.layer_prefix.format(i=k)
        prefix_src = family.layer_prefix.format(i=hop.layer)
        after = hops[k + 1].transform if k + 1 < len(hops) else IDENTITY
        src_shapes = family.layer_tensors(src_cfg)
        out_shapes = family.layer_tensors({**src_cfg, family.mlp_bias_key: True}) if biased else src_shapes
        for suffix, shape in out_shapes.items():
            src = prefix_src + suffix if suffix in src_shapes else None
            if suffix == f"{family.down_proj}.weight":
                tasks.append(TensorTask(prefix_out + suffix, shape, hop.model, src, "down", after))
            elif suffix == f"{family.down_proj}.bias":
                tasks.append(TensorTask(prefix_out + suffix, shape, hop.model, src, "down_bias", after))
            else:
                tasks.append(TensorTask(prefix_out + suffix, shape, hop.model, src, "copy" if src else "zeros"))
    tasks += _head_tasks(recipe, family, out_cfg, classification, keep_tied)
    config = _output_config(recipe, family, configs, classification, keep_tied, biased, dtype)
    return Plan(recipe, family, configs, config, tasks, classification)


def _kind(value: float | torch.Tensor, identity: float) -> str | None:
    """The compact layout's name for a scale or bias: None when it is the identity's."""
    if isinstance(value, float):
        return None if value == identity else "scalar"
    return "vector" if value.ndim == 1 else "matrix"


def hop_table(recipe: Recipe) -> tuple[list[list[int]], list[list]]:
    """The compact layout's hop table of ``recipe`` (its config's ``dfs_layers`` and ``dfs_hops``): each used
    source layer ``[model, layer]`` stored once, and per hop ``[stored layer, scale kind, bias kind]``."""
    used = recipe.used_layers()
    stored = {layer: u for u, layer in enumerate(used)}
    hops = [[stored[(hop.model, hop.layer)], _kind(hop.transform.scale, 1.0), _kind(hop.transform.bias, 0.0)]
            for hop in recipe.hops]
    return [list(x) for x in used], hops


def compact_transforms(config: dict, where: str) -> dict[str, tuple[int, ...]]:
    """Check a compact config's hop table against itself (the layout :func:`compact_plan` writes) and return the
    shapes of the transform tensors it declares, by name: ``dfs_layers`` a list of ``[model, layer]``,
    ``dfs_hops`` a non-empty list of ``[stored layer, scale kind, bias kind]`` (kinds None, ``scalar``, ``vector``
    or ``matrix``) that runs every stored layer, ``num_hidden_layers`` its length. Raises RecipeError naming
    ``where`` (e.g. ``FOLDER: config.json``) and the entry. Reads no weights."""
    layers, hops, hidden = config.get("dfs_layers"), config.get("dfs_hops"), config.get("hidden_size")
    if not isinstance(layers, list) or not all(isinstance(x, list) and len(x) == 2 and all(
            type(i) is int and i >= 0 for i in x) for x in layers):
        raise RecipeError(f"{where}: dfs_layers: expected a list of [model, layer] pairs of indices, got "
                          f"{brief(layers)}")
    if not isinstance(hops, list) or not hops or not all(isinstance(h, list) and len(h) == 3 for h in hops):
        raise RecipeError(f"{where}: dfs_hops: expected a list of [stored layer, scale kind, bias kind], got "
                          f"{brief(hops)}")
    kinds = {None: None, "scalar": (), "vector": (hidden,), "matrix": (hidden, hidden)}
    shapes = {}
    for k, (u, scale, bias) in enumerate(hops):
        if type(u) is not int or not 0 <= u < len(layers):
            raise RecipeError(f"{where}: dfs_hops[{k}]: expected a stored layer in [0, {len(layers)}), got {brief(u)}")
        for part, kind in (("scale", scale), ("bias", bias)):
            if not isinstance(kind, (str, type(None))) or kind not in kinds:
                raise RecipeError(f"{where}: dfs_hops[{k}]: {part} kind: expected one of {list(kinds)}, got "
                                  f"{brief(kind)}")
            if kind is not None:
                shapes[HOP_TRANSFORM.format(k=k) + part] = kinds[kind]
    unused = sorted(set(range(len(layers))) - {u for u, _, _ in hops})
    if unused:
        raise RecipeError(f"{where}: dfs_layers: stored layer {unused[0]} is run by no hop of dfs_hops")
    if config.get("num_hidden_layers") != len(hops):
        raise RecipeError(f"{where}: num_hidden_layers: expected {len(hops)}, the number of hops in dfs_hops, got "
                          f"{brief(config.get('num_hidden_layers'))}")
    return shapes


def compact_plan(recipe: Recipe, configs: list[dict], dtype: str | torch.dtype = "bfloat16") -> Plan:
    """Validate ``recipe`` against the source configs and plan its compact checkpoint (also the config of the
    in-memory model that ``assemble`` builds). Unlike the flat layout it takes biases in any family."""
    dtype = dtype_name(dtype)
    family, classification = _checked(recipe, configs, dtype)
    if not family.dfs:
        raise RecipeError(f"models: the compact format and in-memory models support "
                          f"{sorted(f for f in FAMILIES if FAMILIES[f].dfs)}, not {family.model_type}; use the "
                          "flat format (dfsmerge merge)")
    out_cfg = configs[recipe.output_model]
    # T_0 runs at run time, so the embedding table stays as it is and a tied head can stay tied
    tied = (bool(out_cfg.get("tie_word_embeddings", False)) and not classification
            and recipe.input_model == recipe.output_model)
    hidden, vocab = out_cfg["hidden_size"], out_cfg["vocab_size"]
    used, hops = hop_table(recipe)
    shapes = {"scalar": (), "vector": (hidden,), "matrix": (hidden, hidden)}

    tasks = [TensorTask(family.embed, (vocab, hidden), recipe.input_model, family.embed)]
    for u, (m, layer) in enumerate(used):
        prefix = family.layer_prefix.format(i=layer)
        tasks += [TensorTask(STORED_LAYER.format(u=u) + suffix, shape, m, prefix + suffix)
                  for suffix, shape in family.layer_tensors(configs[m]).items()]
    for k, (hop, (_, scale, bias)) in enumerate(zip(recipe.hops, hops)):
        for part, kind in (("scale", scale), ("bias", bias)):
            if kind:
                tasks.append(TensorTask(HOP_TRANSFORM.format(k=k) + part, shapes[kind], hop.model, None, part,
                                        hop.transform))
    tasks += _head_tasks(recipe, family, out_cfg, classification, tied)

    config = _output_config(recipe, family, configs, classification, tied, False, dtype)
    config.update(model_type=family.dfs_model_type,
                  architectures=[family.dfs_class("ForSequenceClassification" if classification else "ForCausalLM")],
                  auto_map=family.dfs_auto_map(), dfs_layers=used, dfs_hops=hops)
    return Plan(recipe, family, configs, config, tasks, classification)


def _head_tasks(recipe: Recipe, family: Family, out_cfg: dict, classification: bool, tied: bool) -> list[TensorTask]:
    """The final norm and the head (``score`` of a classifier; ``lm_head`` unless it stays tied)."""
    hidden, vocab = out_cfg["hidden_size"], out_cfg["vocab_size"]
    tasks = [TensorTask(family.norm, (hidden,), recipe.output_model, family.norm)]
    if classification:
        tasks.append(TensorTask(family.score, (out_cfg.get("num_labels") or len(out_cfg["id2label"]), hidden),
                                recipe.output_model, family.score))
    elif not tied:
        head = family.embed if out_cfg.get("tie_word_embeddings") else family.lm_head
        tasks.append(TensorTask(family.lm_head, (vocab, hidden), recipe.output_model, head))
    return tasks


def _output_config(recipe: Recipe, family: Family, configs: list[dict], classification: bool, tied: bool,
                   biased: bool, dtype: str) -> dict:
    """The output ``config.json``: the output model's, with the input model's special tokens where it sets them
    (its tokenizer is the output's; a causal LM without ``pad_token_id`` leaves a classifier's own, which
    transformers needs to pool a padded batch), and every per-layer setting written out hop by hop, however the
    sources spell it (:func:`effective_config`)."""
    out_cfg, in_cfg = configs[recipe.output_model], configs[recipe.input_model]
    config = {k: v for k, v in out_cfg.items() if k not in ("_name_or_path", "quantization_config", "torch_dtype")}
    config["architectures"] = [family.classifier if classification else family.causal_lm]
    config["num_hidden_layers"] = len(recipe.hops)
    config["dtype"] = dtype
    config["tie_word_embeddings"] = tied
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # they belong to the input model's tokenizer
        if in_cfg.get(key) is not None:
            config[key] = in_cfg[key]
    if biased:
        config[family.mlp_bias_key] = True
    if family.per_layer_keys:
        settings = {m: effective_config(configs[m], family, f"models[{m}] ({recipe.sources[m]})")
                    for m in {h.model for h in recipe.hops}}
        for key in family.per_layer_keys:
            config[key] = [settings[h.model][key][h.layer] for h in recipe.hops]
    return config
