"""``mergekitlite evolve``: search the recipe space instead of guessing the weights.

A search spec (``spec.py``) holds a recipe template whose values may be free parameters, an objective made of
``mergekitlite eval``'s metrics, Q/A tasks and lm-eval tasks (``metrics.py``), and a budget. Optuna's CMA-ES
(``study.py``) proposes recipes; each trial merges one into a temporary folder and measures it (``trial.py``),
in local worker processes or as Ray tasks (``executors.py``); the loop (``search.py``) tells the study each
result as it comes. ``report.py`` writes the best recipe, the leaderboard and plots; ``cli.py`` is the command.
"""

from typing import Any

__all__ = ["SearchOptions", "load_search", "parse_search", "run_search"]


def __getattr__(name: str) -> Any:
    """The API, imported when first used: `mergekitlite --help` and the other commands must not pay for torch,
    which the search's modules import."""
    if name in ("SearchOptions", "run_search"):
        from mergekitlite.evolve import search

        return getattr(search, name)
    if name in ("load_search", "parse_search"):
        from mergekitlite.evolve import spec

        return getattr(spec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
