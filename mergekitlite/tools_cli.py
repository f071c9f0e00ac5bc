"""Sub-commands that look at models rather than merge them: eval, diff, inspect.

``add_commands`` registers them on ``mergekitlite``'s parser; each handler takes
``(args, console)`` and returns an exit code, like the merge commands in cli.py.
"""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Filled in by the eval/diff/inspect work."""
