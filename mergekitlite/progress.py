"""The one progress-bar style of the commands that stream bytes (merge, diff)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


def byte_progress(console: Console, verb: str, *, disable: bool = False) -> Progress:
    """A transient bar: verb, bar, bytes done/total, bytes/s, ETA, and the current tensor's name
    (tasks carry it as the ``tensor`` field)."""
    return Progress(
        TextColumn(f"[bold]{verb}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tensor]}", style="dim"),
        console=console,
        transient=True,
        disable=disable,
    )
