"""Turning DFS checkpoints (compact folders, in-memory DFS models, Sakana's and the earlier executor's layouts)
into flat folders.

Flattening reads any DFS checkpoint as a recipe over one *virtual source*, whose layers are the stored layers
(hop ``k`` = ``(0, u_k, T_k)``), and hands it to ``make_plan``: the folding rules stay in ``plan.py``. Three
layouts are read: ours (compact folders and in-memory DFS models; see ``plan.compact_plan``), Sakana AI's
EvoLLM-JP-v1-10B (config ``num_hops``; ``model.input_layers``, the stored layer of each hop;
``model.input_scales``, the scale of each hop, applied to the hidden state handed to that hop, i.e. the previous
MLP output (the embeddings for hop 0), which is ``S_k`` exactly; layers ``model.layers.i`` stored once) and the
earlier executor's affine layout (the same with ``input_scales`` of shape [hops, H, H] and ``input_bias`` of
shape [hops, H]).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .families import Family, family_of_type
from .plan import (HOP_TRANSFORM, STORED_LAYER, Plan, compact_transforms, dtype_name, hop_table, is_classifier,
                   make_plan)
from .recipe import Hop, Recipe, RecipeError, Source, Transform, load_recipe
from .sources import Checkpoint, open_checkpoint, read_config
from .writer import atomic_folder, card_base_model, check_target, parse_size, write_metadata, write_tensors

__all__ = ["read_dfs_checkpoint", "flatten", "save_flat"]

_DFS_KEYS = ("dfs_layers", "dfs_hops", "num_hops", "auto_map")


def _virtual_config(config: dict, family: Family, num_layers: int) -> dict:
    """The config of the virtual source: the wrapped family's, with one layer per stored layer. Our layout's
    per-layer lists (``layer_types``) have an entry per hop; the virtual source's has one per stored layer, that
    of a hop that runs it (all hops of a stored layer have its source layer's entry)."""
    base = {k: v for k, v in config.items() if k not in _DFS_KEYS}
    base.update(model_type=family.model_type, num_hidden_layers=num_layers,
                architectures=[family.classifier if is_classifier(config) else family.causal_lm])
    if "dfs_hops" in config:
        hop_of = {u: k for k, (u, _, _) in enumerate(config["dfs_hops"])}
        for key in family.per_layer_keys:
            if isinstance(config.get(key), list):
                base[key] = [config[key][hop_of[u]] for u in range(num_layers)]
    return base


def _value(tensor: torch.Tensor) -> float | torch.Tensor:
    tensor = tensor.detach().to("cpu", torch.float32)
    return float(tensor) if tensor.ndim == 0 else tensor


Getters = dict[str, Callable[[], torch.Tensor]]


def _ours(config: dict, tensors: Getters, family: Family) -> tuple[list[Hop], int, Getters]:
    """Our layout (a compact folder, or a DFS model's state dict): the hops, the number of stored layers and the
    stored tensors by their flat names."""
    def part(k: int, name: str, kind: str | None, identity: float) -> float | torch.Tensor:
        if not kind:
            return identity
        value = _value(tensors[HOP_TRANSFORM.format(k=k) + name]())
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise RecipeError(f"tensor {HOP_TRANSFORM.format(k=k) + name!r} holds NaN or infinity")
        return value

    hops = [Hop(0, int(u), Transform(part(k, "scale", scale, 1.0), part(k, "bias", bias, 0.0)), f"dfs_hops[{k}]")
            for k, (u, scale, bias) in enumerate(config["dfs_hops"])]
    stored, transforms = STORED_LAYER.split("{")[0], HOP_TRANSFORM.split("{")[0]
    getters = {name.replace(stored, family.layer_prefix.split("{")[0], 1): get for name, get in tensors.items()
               if not name.startswith(transforms)}
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
    family = family_of_type(str(config.get("model_type")), f"{path}: config.json")
    transforms = compact_transforms(config, f"{path}: config.json") if layout is _ours else {}
    stored = open_checkpoint(source, config, cache_dir)
    missing = [name for name in transforms if name not in stored]
    if missing:
        raise RecipeError(f"{path}: tensor {missing[0]!r}, which config.json's dfs_hops declares, is missing")
    prefix = HOP_TRANSFORM.split("{")[0]
    undeclared = [name for name in stored.names() if layout is _ours and name.startswith(prefix)
                  and name not in transforms]
    if undeclared:  # transformers would drop it: the model would run without the transform the file holds
        raise RecipeError(f"{path}: tensor {undeclared[0]!r} is declared by no hop of config.json's dfs_hops")
    stored.check_shapes(transforms.items(), str(path))
    try:
        hops, num_layers, getters = layout(config, {n: (lambda n=n: stored.get(n)) for n in stored.names()}, family)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    virtual = Checkpoint(source, stored.folder, _virtual_config(config, family, num_layers), getters, stored.note)
    return Recipe([source], hops).check(), virtual


def _in_memory(model: Any) -> tuple[Recipe, Checkpoint]:
    """A DFS model object as a recipe over one virtual source (its own tensors, which it shares with its sources)."""
    config = model.config.to_dict()
    family = family_of_type(config["model_type"], "DFS model")
    tensors = {name: (lambda t=t: t) for name, t in model.state_dict().items()}
    hops, num_layers, getters = _ours(config, tensors, family)
    source = Source("<in-memory DFS model>")
    virtual = Checkpoint(source, None, _virtual_config(config, family, num_layers), getters)
    return Recipe([source], hops).check(), virtual


def _write_flat(folder: Path, recipe: Recipe, virtual: Checkpoint, dtype: str, max_shard_size: str | int,
                progress: bool, allow_overflow: bool = False) -> Plan:
    plan = make_plan(recipe, [virtual.config], dtype)
    write_tensors(folder, plan.tasks, lambda m, name: virtual.get(name), dtype, max_shard_size, progress=progress,
                  allow_overflow=allow_overflow)
    return plan


def _original_recipe(virtual: Checkpoint, cache_dir: str | None) -> Path | None:
    """The ``dfsmerge_recipe.yml`` a compact folder was made from, when its hop table (:func:`plan.hop_table`) is
    the folder's: None when there is none, it cannot be read, or config.json's ``dfs_layers``/``dfs_hops`` were
    changed since (the recipe would not make the model flattened)."""
    file = virtual.folder / "dfsmerge_recipe.yml" if virtual.folder else None
    if file is None or not file.is_file():
        return None
    try:
        table = hop_table(load_recipe(file))
    except RecipeError:
        return None
    config = read_config(virtual.source, cache_dir)
    if table != (config.get("dfs_layers"), config.get("dfs_hops")):
        logging.getLogger("dfsmerge").warning("warning: %s is not copied: config.json's dfs_layers/dfs_hops differ "
                                              "from the hop table it makes", file)
        return None
    return file


def flatten(
    input_path: str | Path,
    output_path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    quiet: bool = False,
    cache_dir: str | None = None,
    command: str | None = None,
    allow_overflow: bool = False,
) -> Path:
    """Write a DFS checkpoint (see :func:`read_dfs_checkpoint`) as a plain folder of its family: one physical
    layer per hop, transforms folded in. Streaming and atomic like ``merge`` (the output may not be, hold or lie
    in the input); ``dtype`` defaults to the input's."""
    parse_size(max_shard_size)
    target = check_target(output_path, force, [input_path])
    recipe, virtual = read_dfs_checkpoint(input_path, cache_dir)
    virtual.check_tokenizer_files("input")  # the output copies them
    dtype = dtype_name(dtype or virtual.config.get("dtype") or virtual.config.get("torch_dtype") or "bfloat16")
    inputs = [input_path] + ([virtual.folder] if virtual.folder else [])
    with atomic_folder(target, force, inputs) as tmp:
        plan = _write_flat(tmp, recipe, virtual, dtype, max_shard_size, progress=not quiet,
                           allow_overflow=allow_overflow)
        # the same model in another layout: it keeps the input's base models (and relation) when its card names
        # them (a compact folder made by dfsmerge), and otherwise derives from the input itself
        lineage = card_base_model(virtual.folder)
        write_metadata(tmp, plan, [virtual], command or f"dfsmerge flatten {input_path} {output_path}",
                       base_model=lineage, relation="merge" if lineage else None)
        (tmp / "dfsmerge_recipe.yml").unlink()  # a recipe over the virtual source is no recipe anyone can run
        original = _original_recipe(virtual, cache_dir)
        if original is not None:  # the recipe the compact folder was made from
            shutil.copyfile(original, tmp / original.name)
    return target


def save_flat(model: Any, save_directory: str | Path, *, max_shard_size: str | int = "5GB") -> None:
    """``save_pretrained`` of a DFS model in the flat format: weights, ``config.json`` and
    ``generation_config.json`` into ``save_directory`` (created if needed; other files are left alone)."""
    dtype = dtype_name(model.dtype)
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("model*.safetensors"), *folder.glob("model.safetensors.index.json")]:
        stale.unlink()
    recipe, virtual = _in_memory(model)
    plan = _write_flat(folder, recipe, virtual, dtype, max_shard_size, progress=False)
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
