"""Every exception mergekitlite raises on purpose.

Each subclasses the builtin it specializes, so callers that already catch ``ValueError`` or
``FileNotFoundError`` keep working, and the CLI can tell user mistakes (print the message, exit 2)
from bugs (show the traceback).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator, Sequence


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


class NonFiniteError(MergekitliteError, ValueError):
    """``--strict``: a merged tensor holds NaN or ±inf (from its inputs, or an overflow on the cast to
    the output dtype); the output is not finalised."""


class OptionError(MergekitliteError, ValueError):
    """An option (a command-line flag, a MergeOptions field) has a value that cannot work."""


class OutputLockedError(OutputError):
    """Another merge holds the output's lock: two merges must not write the same folder."""


class InputChangedError(MergekitliteError):
    """An input file changed while a merge (or the partial output it resumes) was using it."""


# What to do about an OSError from the file system, by errno, for the ones a user causes and can fix.
_EITHER_WAY = {
    errno.ENOTDIR: "part of the path is a file, not a folder",
    errno.ELOOP: "a symbolic link loop: fix the links",
    errno.ENAMETOOLONG: "the path is too long",
    errno.EIO: "the disk reported an I/O error: check it (dmesg)",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}
_READING = {
    errno.ENOENT: "it disappeared: was it moved or deleted?",
    errno.EACCES: "make it readable by this user (chmod/chown) or run as a user who can read it",
    errno.EPERM: "make it readable by this user (chmod/chown) or run as a user who can read it",
    errno.EISDIR: "it is a folder, not a file",
}
_WRITING = {
    errno.ENOENT: "a folder on the way does not exist (or was removed), or this file system takes no new files",
    errno.EACCES: "make it writable by this user or choose another output folder",
    errno.EPERM: "make it writable by this user or choose another output folder",
    errno.EISDIR: "it is a folder, not a file: move it away",
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (the disk quota is used up)",
    errno.EROFS: "the file system is read-only: choose another output folder",
    errno.EFBIG: "the file system cannot hold files this large (FAT32?): use a smaller --shard-size",
}


def explain_os_error(exc: OSError, path: object | None = None, *, writing: bool = False) -> str | None:
    """``PATH: what happened; what to do`` for an OSError a user can fix (permissions, a full or
    read-only disk, a file where a folder should be...), on one line; None for any other OSError,
    which is left to be reported as a bug."""
    code = exc.errno or 0
    hint = (_WRITING if writing else _READING).get(code) or _EITHER_WAY.get(code)
    if hint is None:
        return None
    where = exc.filename if exc.filename is not None else path
    return f"{where}: {exc.strerror or os.strerror(code)}; {hint}"


@contextlib.contextmanager
def naming(path: object) -> Iterator[None]:
    """Give an OSError raised inside the block the file it concerns: a failed ``write()`` or
    ``sendfile()`` (a full disk) carries no file name, and the message must say which file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message (or its type) on one line, whole sentences: transformers and huggingface_hub
    spread theirs over several lines, and a first line alone can stop mid-sentence."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    return text[: cut + 1] if cut > limit // 3 else text[:limit].rstrip() + "…"
