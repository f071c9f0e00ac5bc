"""Every exception mergekitlite raises on purpose.

Each subclasses the builtin it specializes, so callers that already catch ``ValueError`` or
``FileNotFoundError`` keep working, and the CLI can tell user mistakes (print the message, exit 2)
from bugs (show the traceback).
"""

from __future__ import annotations

from collections.abc import Sequence


class MergekitliteError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class RecipeError(MergekitliteError, ValueError):
    """The recipe file is malformed or inconsistent. ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class PlanError(MergekitliteError, ValueError):
    """The recipe is valid but the models cannot be merged as asked (names, shapes, dtypes...)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ModelNotFoundError(MergekitliteError, FileNotFoundError):
    """A model reference resolves to neither a local folder nor the Hugging Face cache."""


class CheckpointError(MergekitliteError, ValueError):
    """A checkpoint file is unreadable, truncated, or not a format we can read safely."""


class OutputError(MergekitliteError, FileExistsError):
    """The output location is unusable: exists, is inside an input, or holds an unrelated partial merge."""


class UnknownMethodError(RecipeError, KeyError):
    """A merge method name that is not registered."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return "\n".join(self.problems)


class MethodInputError(MergekitliteError, ValueError):
    """A merge method cannot compute a tensor from these (valid but degenerate) values, e.g. the inputs'
    angle or weights make its formula divide by zero. Raised by the method's arithmetic, which knows no
    tensor names; the executor adds the tensor's name."""
