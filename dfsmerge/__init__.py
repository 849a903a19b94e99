"""dfsmerge: data-flow-space merging of language models.

recipe (``recipe.py``) -> plan (``plan.py``) -> streamed output folder (``writer.py``, ``merge.py``; the
compact format and flattening: ``compact.py``) or an in-memory model (``assemble.py`` over ``modeling_dfs.py``)
-> evaluation (``evaluate.py``) -> search (``evolve.py``).
"""

from . import modeling_dfs  # registers the DFS model classes with transformers' Auto classes
from .assemble import Sources, assemble
from .compact import flatten
from .evaluate import load_model, make_evaluators, perplexity
from .evolve import evolve, load_search
from .merge import data_flow_space_layer_merge, dfs_excute_from_config, dfs_execute_from_config, merge, plan_recipe
from .recipe import Hop, Recipe, RecipeError, Source, Transform, load_recipe, parse_recipe, recipe_from_legacy

__version__ = "0.1.0"

__all__ = [
    "merge", "plan_recipe", "dfs_execute_from_config", "dfs_excute_from_config", "data_flow_space_layer_merge",
    "assemble", "Sources", "flatten", "evolve", "load_search", "make_evaluators", "perplexity", "load_model",
    "Recipe", "Hop", "Source", "Transform", "RecipeError", "load_recipe", "parse_recipe", "recipe_from_legacy",
]
