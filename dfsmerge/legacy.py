"""The earlier DFS executor's Python API, kept for old scripts: recipes executed into ``(model, tokenizer)``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .assemble import assemble
from .merge import merge, plan_recipe
from .plan import Plan, dtype_name, torch_dtype
from .recipe import Recipe, load_recipe, parse_recipe, recipe_from_legacy
from .writer import check_target

__all__ = ["dfs_execute_from_config", "dfs_excute_from_config", "data_flow_space_layer_merge"]


def dfs_execute_from_config(
    merge_config: str | Path | dict | Recipe,
    output_path: str | Path | None = None,
    device: str = "cpu",
    dtype: str | torch.dtype = "bfloat16",
    cache_dir: str | None = None,
    force: bool = False,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Legacy entry point: execute a recipe file (or dict), return ``(model, tokenizer)`` in memory; with
    ``output_path`` the flat model is also written there."""
    dtype = dtype_name(dtype)
    recipe = parse_recipe(merge_config) if isinstance(merge_config, dict) else (
        merge_config if isinstance(merge_config, Recipe) else load_recipe(merge_config))
    if output_path is not None:
        merge(recipe, output_path, dtype=dtype, device=device, force=force, cache_dir=cache_dir, quiet=True, **kwargs)
        return _load(output_path, dtype, device)
    return assemble(recipe, dtype=dtype, device=device, cache_dir=cache_dir)


dfs_excute_from_config = dfs_execute_from_config  # the earlier executor's spelling, kept for old scripts


def _load(path: str | Path, dtype: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    is_cls = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    auto = AutoModelForSequenceClassification if is_cls else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=torch_dtype(dtype)).to(device)
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
            check_target(output_path, True, [s.path for s in recipe.sources])  # never into a source
            Path(output_path).mkdir(parents=True, exist_ok=True)
            (Path(output_path) / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
        return plan
    return dfs_execute_from_config(recipe, output_path, device=device, dtype=dtype, cache_dir=cache_dir)
