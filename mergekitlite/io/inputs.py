"""Opening input files with errors a user can act on.

A dangling symbolic link (a hub cache whose blob was deleted, a model folder copied without its link
targets), a folder or a FIFO where a weights file should be, a file this user may not read: each is one
line naming the path and what to do, instead of a traceback (or, for a FIFO, a hang).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from mergekitlite.errors import CheckpointError, explain_os_error


def check_input_file(path: Path) -> os.stat_result:
    """``stat`` of a regular file that exists; CheckpointError naming ``path`` otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CheckpointError(
                f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: restore the file it "
                "points to, or download the model again"
            ) from None
        raise CheckpointError(f"{path}: no such file (was it moved or deleted?)") from None
    except OSError as exc:
        raise input_error(exc, path) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise CheckpointError(f"{path} is {kind}; a file was expected there")
    return st


def input_file_size(path: Path) -> int:
    return check_input_file(path).st_size


def open_input(path: Path) -> BinaryIO:
    """``open(path, "rb")`` with a one-line CheckpointError for what the user can fix."""
    try:
        return open(path, "rb")  # the caller closes it
    except OSError as exc:
        raise input_error(exc, path) from None


def input_error(exc: OSError, path: Path) -> Exception:
    """The CheckpointError for an OSError met reading an input, or ``exc`` itself when it is not
    something a user causes (then it is a bug, reported with its traceback)."""
    text = explain_os_error(exc, path)
    return CheckpointError(text) if text else exc


def read_text_input(path: Path) -> str:
    """A UTF-8 text file of a model folder (config.json, an index), with one-line errors."""
    check_input_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); it should be JSON written in UTF-8"
        ) from None
    except OSError as exc:
        raise input_error(exc, path) from None
