"""mergekitlite: YAML-recipe driven, streaming weight-arithmetic merges of LLM checkpoints.

from mergekitlite import run_merge
result = run_merge("recipes/nekoqarasu.yaml", "out/nekoqarasu")
"""

__version__ = "0.1.0"

from mergekitlite.api import MergeOptions, MergeResult, plan_merge, run_merge
from mergekitlite.recipe import Recipe, load_recipe, parse_recipe

__all__ = [
    "MergeOptions",
    "MergeResult",
    "Recipe",
    "__version__",
    "load_recipe",
    "parse_recipe",
    "plan_merge",
    "run_merge",
]
