"""dfsmerge: data-flow-space merging of language models.

recipe (``recipe.py``) -> plan (``plan.py``) -> streamed output folder (``writer.py``, ``merge.py``)
or an in-memory model (``assemble.py``) -> evaluation (``evaluate.py``) -> search (``evolve.py``).
"""

from .merge import data_flow_space_layer_merge, dfs_excute_from_config, dfs_execute_from_config, merge, plan_recipe
from .recipe import Hop, Recipe, RecipeError, Source, Transform, load_recipe, parse_recipe, recipe_from_legacy

__version__ = "0.1.0"

__all__ = [
    "merge", "plan_recipe", "dfs_execute_from_config", "dfs_excute_from_config", "data_flow_space_layer_merge",
    "Recipe", "Hop", "Source", "Transform", "RecipeError", "load_recipe", "parse_recipe", "recipe_from_legacy",
]
