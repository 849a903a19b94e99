"""Executing a recipe into a standard Hugging Face model folder (the flat format) or a compact DFS folder."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .plan import Plan, check_device, compact_plan, dtype_name, make_plan
from .recipe import Recipe, RecipeError, load_recipe
from .sources import Checkpoint, open_checkpoint, read_config
from .writer import atomic_folder, check_target, parse_size, write_metadata, write_modeling_file, write_tensors

if TYPE_CHECKING:
    import torch

__all__ = ["merge", "plan_recipe", "open_sources"]

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
    return (compact_plan if format == "compact" else make_plan)(recipe, configs, dtype)


def open_sources(plan: Plan, cache_dir: str | None = None) -> list[Checkpoint | None]:
    """Open the sources a plan reads (None for a source it does not use)."""
    recipe = plan.recipe
    used = {h.model for h in recipe.hops} | {recipe.input_model, recipe.output_model}
    checkpoints = [open_checkpoint(s, plan.configs[i], cache_dir) if i in used else None
                   for i, s in enumerate(recipe.sources)]
    for i, checkpoint in enumerate(checkpoints):
        if checkpoint is not None:
            checkpoint.check_shapes(((t.src_name, t.shape) for t in plan.tasks if t.model == i), f"models[{i}]")
    checkpoints[recipe.input_model].check_tokenizer_files(f"models[{recipe.input_model}]")  # the output copies them
    return checkpoints


def merge(
    recipe: Recipe | str | Path,
    output_path: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str = "cpu",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    quiet: bool = False,
    cache_dir: str | None = None,
    command: str | None = None,
    format: str = "flat",
    allow_overflow: bool = False,
    notes: str = "",
) -> Path:
    """Execute ``recipe`` into a plain ``*ForCausalLM`` / ``*ForSequenceClassification`` folder at
    ``output_path``, or with ``format="compact"`` into a compact DFS checkpoint (each used source layer stored
    once; see ``plan.compact_plan``). Everything is validated before any weight is read (the output path against
    the sources: see ``writer.check_target``); the folder appears only when complete. ``dtype`` is a name
    (``"bfloat16"``) or a ``torch.dtype``; ``allow_overflow`` writes values beyond its range as +-inf instead of
    stopping; ``notes`` (Markdown, e.g. the summary of the search that found the recipe) end the model card."""
    dtype, device = dtype_name(dtype), check_device(device)
    parse_size(max_shard_size)
    recipe = _as_recipe(recipe)
    inputs = [s.path for s in recipe.sources]
    target = check_target(output_path, force, inputs)
    plan = plan_recipe(recipe, dtype, cache_dir, format)
    checkpoints = open_sources(plan, cache_dir)
    inputs += [c.folder for c in checkpoints if c is not None and c.folder is not None]
    log.info("merging %d hops from %d sources into %s", len(plan.recipe.hops), len(plan.recipe.sources), target)
    with atomic_folder(target, force, inputs) as tmp:
        write_tensors(tmp, plan.tasks, lambda m, name: checkpoints[m].get(name), dtype, max_shard_size, device,
                      progress=not quiet, locate=lambda m, name: checkpoints[m].stored(name),
                      allow_overflow=allow_overflow)
        write_metadata(tmp, plan, checkpoints, command or _command_line(), notes=notes)
        if format == "compact":
            write_modeling_file(tmp)
    return target


def _command_line() -> str:
    return shlex.join(["dfsmerge", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("dfsmerge", "__main__.py") \
        else "dfsmerge.merge(...) from Python"
