"""Executing a recipe into a standard Hugging Face model folder (the "flat" format), and the legacy API."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .plan import Plan, make_plan
from .recipe import Recipe, RecipeError, dump_native, load_recipe, recipe_from_legacy
from .sources import Checkpoint, open_checkpoint, read_config
from .writer import atomic_folder, check_target, parse_size, write_tensors

__all__ = ["merge", "plan_recipe", "open_sources", "dfs_execute_from_config", "dfs_excute_from_config",
           "data_flow_space_layer_merge"]

log = logging.getLogger("dfsmerge")


def _as_recipe(recipe: Recipe | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def plan_recipe(recipe: Recipe | str | Path, dtype: str = "bfloat16", cache_dir: str | None = None,
                format: str = "flat") -> Plan:
    """Validate a recipe against its sources' configs (no weights read) and plan the output in ``format``
    (``"flat"`` or ``"compact"``)."""
    if format not in ("flat", "compact"):
        raise RecipeError(f"format: expected 'flat' or 'compact', got {format!r}")
    recipe = _as_recipe(recipe)
    configs = [read_config(s, cache_dir) for s in recipe.sources]
    if format == "compact":
        from .compact import compact_plan

        return compact_plan(recipe, configs, dtype)
    return make_plan(recipe, configs, dtype)


def open_sources(plan: Plan, cache_dir: str | None = None) -> list[Checkpoint | None]:
    """Open the sources a plan reads (None for a source it does not use)."""
    recipe = plan.recipe
    used = {h.model for h in recipe.hops} | {recipe.input_model, recipe.output_model}
    return [open_checkpoint(s, plan.configs[i], cache_dir) if i in used else None
            for i, s in enumerate(recipe.sources)]


def merge(
    recipe: Recipe | str | Path,
    output_path: str | Path,
    *,
    dtype: str = "bfloat16",
    device: str = "cpu",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    quiet: bool = False,
    cache_dir: str | None = None,
    command: str | None = None,
    format: str = "flat",
) -> Path:
    """Execute ``recipe`` into a plain ``*ForCausalLM`` / ``*ForSequenceClassification`` folder at
    ``output_path``, or with ``format="compact"`` into a compact DFS checkpoint (each used source layer stored
    once; see ``compact.py``). Everything is validated before any weight is read; the folder appears only when
    complete."""
    target = Path(output_path)
    check_target(target, force)
    parse_size(max_shard_size)
    plan = plan_recipe(recipe, dtype, cache_dir, format)
    checkpoints = open_sources(plan, cache_dir)
    log.info("merging %d hops from %d sources into %s", len(plan.recipe.hops), len(plan.recipe.sources), target)
    with atomic_folder(target, force) as tmp:
        write_tensors(tmp, plan.tasks, lambda m, name: checkpoints[m].get(name), dtype, max_shard_size, device,
                      progress=not quiet)
        write_metadata(tmp, plan, checkpoints, command or _command_line())
        if format == "compact":
            from .compact import write_modeling_file

            write_modeling_file(tmp)
    return target


def _command_line() -> str:
    return shlex.join(["dfsmerge", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("dfsmerge", "__main__.py") \
        else "dfsmerge.merge(...) from Python"


def write_metadata(folder: Path, plan: Plan, checkpoints: Sequence[Checkpoint | None], command: str) -> None:
    """config.json, the input model's tokenizer and generation files, the recipe and a model card."""
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    source = checkpoints[plan.recipe.input_model]
    for file in source.tokenizer_files():
        shutil.copyfile(file, folder / file.name)
    (folder / "dfsmerge_recipe.yml").write_text(dump_native(plan.recipe))
    (folder / "README.md").write_text(model_card(plan, checkpoints, command))


def model_card(plan: Plan, checkpoints: Sequence[Checkpoint | None], command: str) -> str:
    """A Hugging Face model card naming the sources, the hop table and how the model was made."""
    recipe = plan.recipe
    lines = ["---", "library_name: transformers", "tags: [merge, dfsmerge, data-flow-space]", "---", "",
             "# DFS merge", "",
             f"Made with dfsmerge by a data-flow-space merge of {len(recipe.sources)} "
             f"models: {len(recipe.hops)} decoder layers, {_kind_of_output(plan)}", "", "## Sources", ""]
    for i, src in enumerate(recipe.sources):
        note = checkpoints[i].note if checkpoints[i] is not None and checkpoints[i].note else ""
        lines.append(f"- {i}: `{src.path}` revision `{src.revision or 'default'}`" + (f" ({note})" if note else ""))
    lines += ["", f"Embeddings and tokenizer from model {recipe.input_model}; final norm and head from model "
              f"{recipe.output_model}.", "", "## Hops", "", recipe.hop_table(), "", "## Command", "",
              f"    {command}", "", "The recipe is in `dfsmerge_recipe.yml`.", ""]
    return "\n".join(lines)


def _kind_of_output(plan: Plan) -> str:
    if "dfs_hops" in plan.config:
        return ("a compact checkpoint: each source layer is stored once and run by the `modeling_dfs.py` beside "
                "it (load with `trust_remote_code=True`, or with dfsmerge installed); `dfsmerge flatten` turns it "
                "into a plain model.")
    return f"a plain `{plan.config['architectures'][0]}` that needs no custom code."


def dfs_execute_from_config(
    merge_config: str | Path | dict | Recipe,
    output_path: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "bfloat16",
    cache_dir: str | None = None,
    force: bool = False,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Legacy entry point: execute a recipe file (or dict), return ``(model, tokenizer)`` in memory; with
    ``output_path`` the flat model is also written there."""
    from .recipe import parse_recipe

    recipe = parse_recipe(merge_config) if isinstance(merge_config, dict) else _as_recipe(merge_config)
    if output_path is not None:
        merge(recipe, output_path, dtype=dtype, device=device, force=force, cache_dir=cache_dir, quiet=True, **kwargs)
        return _load(output_path, dtype, device)
    from .assemble import assemble

    return assemble(recipe, dtype=dtype, device=device, cache_dir=cache_dir)


dfs_excute_from_config = dfs_execute_from_config  # the earlier executor's spelling, kept for old scripts


def _load(path: str | Path, dtype: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    is_cls = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    auto = AutoModelForSequenceClassification if is_cls else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    return model, AutoTokenizer.from_pretrained(path)


def data_flow_space_layer_merge(
    model_paths: Sequence[Any],
    num_r: int,
    layer_mask: Any,
    scaling_factors: Any = None,
    bias_factors: Any = None,
    add_last_layer: bool = True,
    last_layer_scale: float = 1.0,
    input_layer_model: int = 0,
    output_layer_model: int = 0,
    output_path: str | Path | None = None,
    save_only_config: bool = False,
    device: str = "cpu",
    cache_dir: str | None = None,
    classification: bool | None = None,
    dtype: str = "bfloat16",
) -> tuple[Any, Any] | Plan:
    """Legacy entry point with the earlier executor's keyword arguments. ``save_only_config`` validates and
    writes only ``config.json`` (and returns the plan) without reading weights."""
    recipe = recipe_from_legacy(model_paths, num_r, layer_mask, scaling_factors, bias_factors, input_layer_model,
                                output_layer_model, add_last_layer, last_layer_scale, classification)
    if save_only_config:
        plan = plan_recipe(recipe, dtype, cache_dir)
        if output_path is not None:
            Path(output_path).mkdir(parents=True, exist_ok=True)
            (Path(output_path) / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
        return plan
    return dfs_execute_from_config(recipe, output_path, device=device, dtype=dtype, cache_dir=cache_dir)
