"""The compact format, and turning DFS checkpoints (compact folders, in-memory DFS models) into flat folders.

Compact: each used source layer stored once (``model.dfs_layers.{u}.*``), the hop table in ``config.json`` and the
per-hop transforms as tensors (``model.dfs_transforms.{k}.scale`` / ``.bias``), run by the ``modeling_dfs.py``
the folder carries. It is planned here as a :class:`~dfsmerge.plan.Plan` and written by the same streaming writer
as the flat format.

Flattening reads any DFS checkpoint as a recipe over one *virtual source*, whose layers are the stored layers
(hop ``k`` = ``(0, u_k, T_k)``), and hands it to ``make_plan``: the folding rules stay in ``plan.py``. Three
layouts are read: ours (compact folders and in-memory DFS models), Sakana AI's EvoLLM-JP-v1-10B (config
``num_hops``; ``model.input_layers``, the stored layer of each hop; ``model.input_scales``, the scale of each
hop, applied to the hidden state handed to that hop, i.e. the previous MLP output (the embeddings for hop 0),
which is ``S_k`` exactly; layers ``model.layers.i`` stored once) and the earlier executor's affine layout (the
same with ``input_scales`` of shape [hops, H, H] and ``input_bias`` of shape [hops, H]).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .families import FAMILIES, Family
from .plan import DTYPES, Plan, TensorTask, _is_classifier, _output_config, _validate, make_plan
from .recipe import Hop, Recipe, RecipeError, Source, Transform
from .sources import Checkpoint, open_checkpoint, read_config
from .writer import atomic_folder, check_target, parse_size, write_tensors

__all__ = ["compact_plan", "write_modeling_file", "read_dfs_checkpoint", "flatten", "save_flat"]

STORED = "model.dfs_layers.{u}."
TRANSFORM = "model.dfs_transforms.{k}."
MODELING_FILE = Path(__file__).with_name("modeling_dfs.py")
_DFS_KEYS = ("dfs_layers", "dfs_hops", "num_hops", "auto_map")


# ---------------------------------------------------------------------------------------------------- writing


def _kind(value: float | torch.Tensor, identity: float) -> str | None:
    """The compact format's name for a scale or bias: None when it is the identity's."""
    if isinstance(value, float):
        return None if value == identity else "scalar"
    return "vector" if value.ndim == 1 else "matrix"


def _shape(kind: str, hidden: int) -> tuple[int, ...]:
    return {"scalar": (), "vector": (hidden,), "matrix": (hidden, hidden)}[kind]


def compact_plan(recipe: Recipe, configs: list[dict], dtype: str = "bfloat16") -> Plan:
    """Validate ``recipe`` against the source configs and plan its compact checkpoint (also the config of the
    in-memory model that ``assemble`` builds). Unlike the flat format it takes biases in any family."""
    from .modeling_dfs import DFS_CLASSES

    if dtype not in DTYPES:
        raise RecipeError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    family = _validate(recipe, configs)
    if family.model_type not in DFS_CLASSES:
        raise RecipeError(f"models: the compact format and in-memory models support {sorted(DFS_CLASSES)}, not "
                          f"{family.model_type}; use the flat format (dfsmerge merge)")
    out_cfg = configs[recipe.output_model]
    classification = _is_classifier(out_cfg) if recipe.classification is None else recipe.classification
    if classification and not _is_classifier(out_cfg):
        raise RecipeError(f"classification: models[{recipe.output_model}] (output_layer_model) is not a "
                          "*ForSequenceClassification model, so it has no score head")
    # T_0 runs at run time, so the embedding table stays as it is and a tied head can stay tied
    tied = (bool(out_cfg.get("tie_word_embeddings", False)) and not classification
            and recipe.input_model == recipe.output_model)
    hidden, vocab = out_cfg["hidden_size"], out_cfg["vocab_size"]
    used = recipe.used_layers()
    stored = {layer: u for u, layer in enumerate(used)}

    tasks = [TensorTask(family.embed, (vocab, hidden), recipe.input_model, family.embed)]
    for u, (m, layer) in enumerate(used):
        prefix = family.layer_prefix.format(i=layer)
        tasks += [TensorTask(STORED.format(u=u) + suffix, shape, m, prefix + suffix)
                  for suffix, shape in family.layer_tensors(configs[m]).items()]
    hops = []
    for k, hop in enumerate(recipe.hops):
        t = hop.transform
        scale, bias = _kind(t.scale, 1.0), _kind(t.bias, 0.0)
        hops.append([stored[(hop.model, hop.layer)], scale, bias])
        for part, kind in (("scale", scale), ("bias", bias)):
            if kind:
                tasks.append(TensorTask(TRANSFORM.format(k=k) + part, _shape(kind, hidden), hop.model, None, part, t))
    tasks.append(TensorTask(family.norm, (hidden,), recipe.output_model, family.norm))
    if classification:
        tasks.append(TensorTask(family.score, (out_cfg.get("num_labels") or len(out_cfg["id2label"]), hidden),
                                recipe.output_model, family.score))
    elif not tied:
        head = family.embed if out_cfg.get("tie_word_embeddings") else family.lm_head
        tasks.append(TensorTask(family.lm_head, (vocab, hidden), recipe.output_model, head))

    config_class, causal_lm, classifier = DFS_CLASSES[family.model_type]
    config = _output_config(recipe, family, configs, classification, tied, False, dtype)
    config.update(model_type=config_class.model_type,
                  architectures=[(classifier if classification else causal_lm).__name__],
                  auto_map=config_class.default_auto_map(), dfs_layers=[list(x) for x in used], dfs_hops=hops)
    return Plan(recipe, family, configs, config, tasks, classification)


def write_modeling_file(folder: Path) -> None:
    """Put the modeling code a compact checkpoint runs on (``auto_map`` points to it) into ``folder``."""
    shutil.copyfile(MODELING_FILE, Path(folder) / MODELING_FILE.name)


# ---------------------------------------------------------------------------------------------------- reading


def _family_of_type(model_type: str, where: str) -> Family:
    """The family a DFS model type wraps: ``dfs_mistral``, ``evomistral``, ``evomistralaffine`` -> mistral."""
    for name in sorted(FAMILIES, key=len, reverse=True):
        if name in model_type:
            return FAMILIES[name]
    raise RecipeError(f"{where}: model_type {model_type!r} names none of the families {sorted(FAMILIES)}")


def _virtual_config(config: dict, family: Family, num_layers: int) -> dict:
    """The config of the virtual source: the wrapped family's, with one layer per stored layer."""
    base = {k: v for k, v in config.items() if k not in _DFS_KEYS}
    base.update(model_type=family.model_type, num_hidden_layers=num_layers,
                architectures=[family.classifier if _is_classifier(config) else family.causal_lm])
    return base


def _value(tensor: torch.Tensor) -> float | torch.Tensor:
    tensor = tensor.detach().to("cpu", torch.float32)
    return float(tensor) if tensor.ndim == 0 else tensor


Getters = dict[str, Callable[[], torch.Tensor]]


def _ours(config: dict, tensors: Getters, family: Family) -> tuple[list[Hop], int, Getters]:
    """Our layout (a compact folder, or a DFS model's state dict): the hops, the number of stored layers and the
    stored tensors by their flat names."""
    def part(k: int, name: str, kind: str | None, identity: float) -> float | torch.Tensor:
        return _value(tensors[TRANSFORM.format(k=k) + name]()) if kind else identity

    hops = [Hop(0, int(u), Transform(part(k, "scale", scale, 1.0), part(k, "bias", bias, 0.0)), f"dfs_hops[{k}]")
            for k, (u, scale, bias) in enumerate(config["dfs_hops"])]
    getters = {name.replace("model.dfs_layers.", "model.layers.", 1): get for name, get in tensors.items()
               if not name.startswith("model.dfs_transforms.")}
    return hops, len(config["dfs_layers"]), getters


def _evo(config: dict, tensors: Getters, family: Family) -> tuple[list[Hop], int, Getters]:
    """Sakana's EvoLLM layout, and the earlier executor's affine one (matrix scales, ``input_bias``)."""
    names = {n.removeprefix("model."): n for n in tensors if n.removeprefix("model.").startswith("input_")}
    if "input_layers" not in names or "input_scales" not in names:
        raise RecipeError("config has num_hops, but the tensors input_layers and input_scales are missing")
    layers = tensors[names["input_layers"]]().reshape(-1).tolist()
    scales = tensors[names["input_scales"]]()
    bias = tensors[names["input_bias"]]() if "input_bias" in names else None
    if not len(layers) == scales.shape[0] == config["num_hops"]:
        raise RecipeError(f"num_hops = {config['num_hops']}, input_layers has {len(layers)} entries, input_scales "
                          f"shape {tuple(scales.shape)}; expected one entry per hop")
    hops = [Hop(0, int(layer), Transform(_value(scales[k]), 0.0 if bias is None else _value(bias[k])),
                f"input_layers[{k}]") for k, layer in enumerate(layers)]
    prefix = family.layer_prefix.split("{i}")[0]
    num_layers = 1 + max(int(n[len(prefix):].split(".")[0]) for n in tensors if n.startswith(prefix))
    return hops, num_layers, {n: get for n, get in tensors.items() if n not in names.values()}


def read_dfs_checkpoint(path: str | Path, cache_dir: str | None = None) -> tuple[Recipe, Checkpoint]:
    """A DFS checkpoint (ours, Sakana's, the affine layout; a local folder or a hub ID) as a recipe over one
    virtual source, and that source: its config is the wrapped family's, its tensors have the flat names."""
    source = Source(str(path))
    config = read_config(source, cache_dir)
    layout = _ours if "dfs_hops" in config else _evo if "num_hops" in config else None
    if layout is None:
        raise RecipeError(f"{path}: not a DFS checkpoint (its config.json has neither dfs_hops, ours, nor "
                          "num_hops, Sakana's layout)")
    family = _family_of_type(str(config.get("model_type")), f"{path}: config.json")
    stored = open_checkpoint(source, config, cache_dir)
    try:
        hops, num_layers, getters = layout(config, {n: (lambda n=n: stored.get(n)) for n in stored.names()}, family)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    virtual = Checkpoint(source, stored.folder, _virtual_config(config, family, num_layers), getters, stored.note)
    return Recipe([source], hops).check(), virtual


def _in_memory(model: Any) -> tuple[Recipe, Checkpoint]:
    """A DFS model object as a recipe over one virtual source (its own tensors, which it shares with its sources)."""
    config = model.config.to_dict()
    family = _family_of_type(config["model_type"], "DFS model")
    tensors = {name: (lambda t=t: t) for name, t in model.state_dict().items()}
    hops, num_layers, getters = _ours(config, tensors, family)
    source = Source("<in-memory DFS model>")
    virtual = Checkpoint(source, None, _virtual_config(config, family, num_layers), getters)
    return Recipe([source], hops).check(), virtual


def _flat_plan(recipe: Recipe, config: dict, dtype: str) -> Plan:
    """``make_plan`` over the virtual source. Mistral has no MLP bias: a Mistral model without a sliding window,
    whose layers are Llama's, becomes a Llama model when a hop carries a bias."""
    biased = any(h.transform.has_bias for h in recipe.hops[1:])
    if biased and config["model_type"] == "mistral" and config.get("sliding_window") is None:
        llama = FAMILIES["llama"]
        config = {k: v for k, v in config.items() if k != "sliding_window"}
        config.update(model_type="llama", architectures=[llama.classifier if _is_classifier(config) else
                                                         llama.causal_lm])
    return make_plan(recipe, [config], dtype)


def _write_flat(folder: Path, recipe: Recipe, virtual: Checkpoint, dtype: str, max_shard_size: str | int,
                progress: bool) -> Plan:
    plan = _flat_plan(recipe, virtual.config, dtype)
    write_tensors(folder, plan.tasks, lambda m, name: virtual.get(name), dtype, max_shard_size, progress=progress)
    return plan


def flatten(
    input_path: str | Path,
    output_path: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    quiet: bool = False,
    cache_dir: str | None = None,
    command: str | None = None,
) -> Path:
    """Write a DFS checkpoint (see :func:`read_dfs_checkpoint`) as a plain Llama / Mistral folder: one physical
    layer per hop, transforms folded in. Streaming and atomic like ``merge``; ``dtype`` defaults to the input's."""
    from .merge import write_metadata

    target = Path(output_path)
    check_target(target, force)
    parse_size(max_shard_size)
    recipe, virtual = read_dfs_checkpoint(input_path, cache_dir)
    dtype = dtype or str(virtual.config.get("dtype") or virtual.config.get("torch_dtype") or "bfloat16")
    with atomic_folder(target, force) as tmp:
        plan = _write_flat(tmp, recipe, virtual, dtype, max_shard_size, progress=not quiet)
        write_metadata(tmp, plan, [virtual], command or f"dfsmerge flatten {input_path} {output_path}")
        original = virtual.folder / "dfsmerge_recipe.yml" if virtual.folder else None
        if original is not None and original.is_file():  # the recipe the compact folder was made from
            shutil.copyfile(original, tmp / original.name)
        else:  # a recipe over the virtual source is no recipe anyone can run
            (tmp / "dfsmerge_recipe.yml").unlink()
    return target


def save_flat(model: Any, save_directory: str | Path, *, max_shard_size: str | int = "5GB") -> None:
    """``save_pretrained`` of a DFS model in the flat format: weights, ``config.json`` and
    ``generation_config.json`` into ``save_directory`` (created if needed; other files are left alone)."""
    dtype = {v: k for k, v in DTYPES.items()}[model.dtype]
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("model*.safetensors"), *folder.glob("model.safetensors.index.json")]:
        stale.unlink()
    recipe, virtual = _in_memory(model)
    plan = _write_flat(folder, recipe, virtual, dtype, max_shard_size, progress=False)
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
