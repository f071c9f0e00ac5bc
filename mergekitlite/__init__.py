"""mergekitlite: YAML-recipe driven, streaming weight-arithmetic merges of LLM checkpoints.

from mergekitlite import run_merge
result = run_merge("recipes/nekoqarasu.yaml", "out/nekoqarasu")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names load their modules on first use (PEP 562), so that `merge --help` and
# `mergekitlite validate` do not pay for importing torch.
_EXPORTS = {
    "MergeOptions": "mergekitlite.options",
    "MergeResult": "mergekitlite.api",
    "StepPlan": "mergekitlite.api",
    "plan_merge": "mergekitlite.api",
    "plan_steps": "mergekitlite.api",
    "run_merge": "mergekitlite.api",
    "Recipe": "mergekitlite.recipe",
    "load_recipe": "mergekitlite.recipe",
    "parse_recipe": "mergekitlite.recipe",
}

if TYPE_CHECKING:
    from mergekitlite.api import MergeResult, StepPlan, plan_merge, plan_steps, run_merge
    from mergekitlite.options import MergeOptions
    from mergekitlite.recipe import Recipe, load_recipe, parse_recipe


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mergekitlite' has no attribute {name!r}")


__all__ = [
    "MergeOptions",
    "MergeResult",
    "Recipe",
    "StepPlan",
    "__version__",
    "load_recipe",
    "parse_recipe",
    "plan_merge",
    "plan_steps",
    "run_merge",
]
