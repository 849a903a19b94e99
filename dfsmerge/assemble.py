"""Candidate models in memory: source models loaded once, each candidate a DFS model over their tensors.

``assemble`` builds the model of ``modeling_dfs.py`` (the same classes the compact format loads into) from
loaded source models instead of from a checkpoint: its stored layers, embeddings, norm and head are copies of
the sources' *module objects* that share every tensor, so building a candidate copies no weight and reads no
file, and a layer used by several hops exists once. Hooks, modes and attributes set on a candidate stay on that
candidate; what changes its tensors (in-place updates, and ``to()`` / ``half()``, which replace a parameter's data
in place) reaches the sources and every other candidate.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .families import family_of
from .plan import check_device, compact_plan, dtype_name, is_classifier, torch_dtype
from .recipe import Recipe, RecipeError, Source, Transform, load_recipe
from .sources import Checkpoint, open_checkpoint, read_config

__all__ = ["load_tokenizer", "Sources", "assemble", "model_from_checkpoint"]

_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"}


class Sources:
    """Source models loaded once with transformers (``dtype``, ``device``) and kept, so that assembling many
    candidates does no I/O. Configs are read when a source is first named, weights when a candidate first needs
    them; local folders, hub IDs and GGUF files are found as ``merge`` finds them.

    A source is read tensor by tensor, each tensor converted to ``dtype`` on its device as it is read
    (``Checkpoint.get_as``): the process never holds a second copy of a model (a float32 file loaded as bfloat16
    peaks at the bfloat16 model plus a 64 MB piece; ``benchmarks/bench_sources.py``), and a tensor that needs
    no conversion stays a zero-copy view of the mapped file. ``device`` is one device (``"cpu"``,
    ``"cuda:1"``), a list of devices that the sources take in turn as they are loaded (round robin), or
    ``"auto"``: each source on the CUDA device with the most free memory when it is loaded (the CPU when there is
    none). A candidate over sources on several devices moves its hidden states at the hops that change device.
    ``"meta"`` places a source as shapes without data: it shows where the parts of a large candidate would live
    without reading its weights (a forward ending there gives shapes only).

    Raises RecipeError for an unknown dtype or a device that torch does not know or this machine lacks."""

    def __init__(self, sources: Iterable[Source | str] = (), dtype: str | torch.dtype = "bfloat16",
                 device: str | Sequence[str] = "cpu", cache_dir: str | None = None):
        self.dtype, self.device, self.cache_dir = dtype_name(dtype), device, cache_dir
        self.devices = _devices(device)
        self._configs: dict[Source, dict] = {}
        self._loaded: dict[Source, tuple[Any, Any]] = {}  # source -> (model, tokenizer or None)
        for source in sources:
            self.config(source)

    def config(self, source: Source | str) -> dict:
        """The source's ``config.json`` (no weights read)."""
        source = _as_source(source)
        if source not in self._configs:
            self._configs[source] = read_config(source, self.cache_dir)
        return self._configs[source]

    def model(self, source: Source | str) -> Any:
        """The source as its own ``*ForCausalLM`` / ``*ForSequenceClassification``, loaded on first use."""
        return self._load(_as_source(source))[0]

    def tokenizer(self, source: Source | str) -> Any:
        """The tokenizer beside the source (None when it has none)."""
        return self._load(_as_source(source))[1]

    def add(self, source: Source | str, model: Any, tokenizer: Any = None) -> None:
        """Use an already-loaded model (of this object's dtype, on any device) as ``source``."""
        source = _as_source(source)
        self._configs[source] = model.config.to_dict()
        self._loaded[source] = (model, tokenizer)

    def next_device(self) -> torch.device:
        """The device the next source loaded goes to."""
        if self.device == "auto" and self.devices[0].type == "cuda":
            return max(self.devices, key=lambda d: torch.cuda.mem_get_info(d)[0])
        return self.devices[len(self._loaded) % len(self.devices)]

    def _load(self, source: Source) -> tuple[Any, Any]:
        if source not in self._loaded:
            import transformers

            config = self.config(source)
            family = family_of(config, str(source))
            checkpoint = open_checkpoint(source, config, self.cache_dir, self.dtype)
            cls = getattr(transformers, family.classifier if is_classifier(config) else family.causal_lm)
            tokenizer = None  # before the weights: a broken tokenizer file is found at once
            if {f.name for f in checkpoint.tokenizer_files()} & _TOKENIZER_FILES:
                tokenizer = load_tokenizer(checkpoint.folder)
            model = model_from_checkpoint(cls, transformers.AutoConfig.for_model(**config), checkpoint,
                                          torch_dtype(self.dtype), self.next_device())
            self._loaded[source] = (model, tokenizer)
        return self._loaded[source]


def load_tokenizer(folder: str | Path) -> Any:
    """transformers' ``AutoTokenizer`` of a model folder. Raises :class:`RecipeError` naming the folder and its
    tokenizer files when they cannot be read (a broken ``tokenizer.json``, a missing one that a slow tokenizer
    would need a package to rebuild, ...)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as exc:  # ImportError:
        # transformers 4.x rebuilding a broken fast tokenizer from a slow one that needs an absent package
        files = sorted(f.name for f in Path(folder).glob("*") if f.name in _TOKENIZER_FILES) or ["no tokenizer file"]
        raise RecipeError(f"{folder}: cannot load the tokenizer ({', '.join(files)}): {type(exc).__name__}: "
                          f"{exc}") from None


def _devices(device: str | torch.device | Sequence[str]) -> list[torch.device]:
    """The devices a ``Sources`` places its sources on; RecipeError names a device torch or this machine lacks."""
    if device == "auto":
        count = torch.cuda.device_count()
        return [torch.device("cuda", i) for i in range(count)] if count else [torch.device("cpu")]
    names = [device] if isinstance(device, (str, torch.device)) else list(device)
    if not names:
        raise RecipeError("device: expected a device, a list of devices or 'auto', got an empty list")
    return [torch.device("meta") if str(name) == "meta" else torch.device(check_device(name)) for name in names]


def model_from_checkpoint(cls: type, config: Any, checkpoint: Checkpoint, dtype: torch.dtype,
                          device: torch.device) -> Any:
    """``cls(config)`` (a transformers model) holding ``checkpoint``'s tensors, each converted to ``dtype`` (a
    floating tensor) on ``device`` as it is read (``Checkpoint.get_as``). The model is built on the meta device, so nothing is allocated
    before the tensors arrive; the modules whose buffers are not in checkpoints (the rotary embedding's inverse
    frequencies) are built again on ``device`` from the config. An untied head missing from the checkpoint is a
    RecipeError naming the tensor; a tied one is tied. Returns the model in eval mode."""
    config.dtype = dtype
    with torch.device("meta"):
        model = cls(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    checkpoint.check_shapes(expected.items(), str(checkpoint.source))
    tied = set() if not config.tie_word_embeddings else {n for n in expected if n.startswith("lm_head.")}
    state = {}
    for name, shape in expected.items():
        if name in tied and name not in checkpoint:
            continue
        state[name] = tensor = checkpoint.get_as(name, dtype, device)
        if tuple(tensor.shape) != shape:  # a tensor whose header was not read: .bin or GGUF
            raise RecipeError(f"{checkpoint.source}: tensor {name!r} has shape {tuple(tensor.shape)}, the config "
                              f"says {shape}")
        if not tensor.is_floating_point():  # as the writer says it of a merge
            raise RecipeError(f"{checkpoint.source}: tensor {name!r} holds {str(tensor.dtype).removeprefix('torch.')}"
                              " values; a weight the config describes must be floating point")
    model.load_state_dict(state, strict=False, assign=True)
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent, _, child = name.rpartition(".")
            with torch.device(device):
                setattr(model.get_submodule(parent), child, type(module)(config))
    if tied:
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left and device.type != "meta":
        raise RuntimeError(f"{checkpoint.source}: tensors left unloaded: {left}")
    return model.eval()


def _as_source(source: Source | str) -> Source:
    return source if isinstance(source, Source) else Source(str(source))


def share(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree of module objects that shares every parameter and buffer with it, but has
    its own hooks, attributes and children tables."""
    clone = copy.copy(module)
    clone.__dict__.update({k: v for k, v in vars(nn.Module()).items() if "hook" in k})
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = {name: None if child is None else share(child) for name, child in module._modules.items()}
    return clone


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter."""
    return next(module.parameters()).device


def inputs_to(device: torch.device) -> Callable:
    """A forward pre-hook (``with_kwargs=True``) that moves the tensors among a module's arguments (also inside
    tuples, such as the rotary embedding's ``(cos, sin)``) to ``device``: a hop running a layer on another device
    than the previous hop takes its input there, the final norm and head take the last hop's output."""
    def moved(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        return tuple(moved(v) for v in value) if type(value) is tuple else value

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return moved(args), {name: moved(value) for name, value in kwargs.items()}

    return hook


def _filled(module: nn.Module, transform: Transform) -> nn.Module:
    """A fresh ``HopTransform`` with the values of a recipe's transform."""
    with torch.no_grad():
        for part in ("scale", "bias"):
            if getattr(module, part) is not None:
                getattr(module, part).copy_(torch.as_tensor(getattr(transform, part)))
    return module


def assemble(
    recipe: Recipe | str | Path,
    sources: Sources | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | Sequence[str] | None = None,
    cache_dir: str | None = None,
) -> tuple[Any, Any]:
    """Build ``recipe`` in memory: ``(model, tokenizer)``, the model a ``DFS*ForCausalLM`` /
    ``DFS*ForSequenceClassification`` (subclasses of the family's) over the tensors of the loaded sources.

    Pass the same ``sources`` to many calls to load each source once. ``dtype`` (default ``"bfloat16"``),
    ``device`` (default ``"cpu"``) and ``cache_dir`` are those of ``sources`` when it is given; passing
    different ones is an error. The recipe is validated against the source configs before any weight is read.
    ``model.save_pretrained(path)`` writes the flat format; ``format="compact"`` the compact one.

    Each part of the candidate runs where its source is: embeddings on the input model's device, a hop on its
    layer's, the final norm and head on the output model's. When they differ, forward pre-hooks move the hidden
    state (and the mask and rotary embeddings) at each change of device; each hop's KV cache stays on its
    layer's device.
    """
    from .modeling_dfs import DFS_CLASSES, HopTransform

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    dtype = None if dtype is None else dtype_name(dtype)
    if sources is None:
        sources = Sources(dtype=dtype or "bfloat16", device=device or "cpu", cache_dir=cache_dir)
    for name, value in (("dtype", dtype), ("device", device), ("cache_dir", cache_dir)):
        if value is not None and value != getattr(sources, name):
            raise RecipeError(f"{name}: {value!r} differs from the sources' {getattr(sources, name)!r}")
    plan = compact_plan(recipe, [sources.config(s) for s in recipe.sources], sources.dtype)
    config_class, causal_lm, classifier = DFS_CLASSES[plan.family.model_type]
    config = config_class(**plan.config)
    with torch.device("meta"):  # a shell of the whole model, without storage: the parts are attached below
        model = (classifier if plan.classification else causal_lm)(config)

    needed = {h.model for h in recipe.hops} | {recipe.input_model, recipe.output_model}
    loaded = {i: sources.model(s) for i, s in enumerate(recipe.sources) if i in needed}
    first, last = loaded[recipe.input_model], loaded[recipe.output_model]
    decoder = model.model
    decoder.embed_tokens = share(first.model.embed_tokens)
    decoder.norm = share(last.model.norm)
    decoder.rotary_emb = share(last.model.rotary_emb)
    decoder.dfs_layers = nn.ModuleList(share(loaded[m].model.layers[layer]) for m, layer in recipe.used_layers())
    # T_0 acts on the embeddings, T_{k+1} inside hop k's MLP: each lives where its input is
    devices = [device_of(decoder.embed_tokens)] + [device_of(decoder.dfs_layers[u]) for u, _, _ in config.dfs_hops]
    transforms = {}
    for k, (_, scale, bias) in enumerate(config.dfs_hops):
        if scale or bias:
            with torch.device(devices[k]):
                transforms[str(k)] = _filled(HopTransform(config.hidden_size, scale, bias), recipe.hops[k].transform)
    decoder.dfs_transforms = nn.ModuleDict(transforms).to(torch_dtype(sources.dtype))
    if plan.classification:
        model.score = share(last.score)
    else:
        model.lm_head = share(last.lm_head)
    if len({*devices, device_of(decoder.norm)}) > 1:  # sources on several devices: move at the device changes
        for module in [*decoder.dfs_layers, decoder.norm]:  # a layer's hop views share its hooks
            module.register_forward_pre_hook(inputs_to(device_of(module)), with_kwargs=True)
    model.eval()  # before the hop views exist: they copy the mode of the layers they view
    decoder.link_hops()
    if model.can_generate():
        model.generation_config = copy.deepcopy(first.generation_config)
    return model, sources.tokenizer(recipe.sources[recipe.input_model])
