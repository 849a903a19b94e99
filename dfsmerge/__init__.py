"""dfsmerge: data-flow-space merging of language models.

recipe (``recipe.py``) -> model knowledge (``families.py``) -> plan, flat and compact (``plan.py``) -> checkpoints
(``sources.py``, ``gguf.py``) -> output folders (``writer.py``; ``merge.py``, ``flatten.py``) or an in-memory model
(``assemble.py`` over ``modeling_dfs.py``; the old API in ``legacy.py``) -> evaluation (``evaluate.py``) -> search
(``evolve.py``) -> command line (``cli.py``). Each module imports only the ones before it (``pyproject.toml``'s
import-linter contract).
"""

from . import modeling_dfs  # registers the DFS model classes with transformers' Auto classes
from .assemble import Sources, assemble
from .evaluate import load_model, make_evaluators, perplexity
from .evolve import evolve, load_search
from .flatten import flatten
from .legacy import data_flow_space_layer_merge, dfs_excute_from_config, dfs_execute_from_config
from .merge import merge, plan_recipe
from .recipe import Hop, Recipe, RecipeError, Source, Transform, load_recipe, parse_recipe, recipe_from_legacy

__version__ = "0.1.0"

__all__ = [
    "merge", "plan_recipe", "dfs_execute_from_config", "dfs_excute_from_config", "data_flow_space_layer_merge",
    "assemble", "Sources", "flatten", "evolve", "load_search", "make_evaluators", "perplexity", "load_model",
    "Recipe", "Hop", "Source", "Transform", "RecipeError", "load_recipe", "parse_recipe", "recipe_from_legacy",
]
