"""Consoles and printing for every command: user text (paths, recipe positions such as
``file.yaml:100:19``, token texts such as ``[INST]``) is printed as it is, never as rich markup or
emoji codes (``:100:`` would become an emoji)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from mergekitlite.errors import MergekitliteError

Handler = Callable[[argparse.Namespace, Console], int]


def make_console(*, stderr: bool = False, quiet: bool = False, width: int | None = None) -> Console:
    """soft_wrap: a message stays on one line whatever the width, so that ``file:line:col: ...``
    lines remain parseable by editors and CI logs; emoji off: ``:100:`` stays ``:100:``; no
    highlighting: numbers inside paths are not coloured at random."""
    return Console(stderr=stderr, quiet=quiet, soft_wrap=True, emoji=False, highlight=False, width=width)


def say(console: Console, text: str, style: str = "") -> None:
    """Print ``text`` literally (no markup, no emoji codes)."""
    console.print(Text(text, style=style))


def labelled(console: Console, label: str, style: str, text: str) -> None:
    """``label`` in ``style``, then ``text`` literally: ``warning: <user text>``."""
    console.print(Text.assemble((label, style), " ", text))


def warn(console: Console, messages: Iterable[str]) -> None:
    for message in messages:
        labelled(console, "warning:", "yellow", message)


def note(console: Console, messages: Iterable[str]) -> None:
    for message in messages:
        say(console, f"note: {message}", "dim")


def write_json(path: Path, data: Any) -> None:
    """A report file (``--json``): indented, UTF-8 as is (token texts stay readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def run_command(handler: Handler, args: argparse.Namespace) -> int:
    """Exit codes: 0 success, 2 a problem the message explains, 130 interrupted, 1 (a traceback) a bug."""
    console = make_console(quiet=getattr(args, "quiet", False))
    errors = make_console(stderr=True)
    try:
        return handler(args, console)
    except MergekitliteError as exc:
        say(errors, f"error: {exc}", "red")
        return 2
    except KeyboardInterrupt:
        say(errors, "interrupted", "red")
        return 130
