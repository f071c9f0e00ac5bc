"""Progress bars: one byte-bar style for the commands that stream bytes (merge, diff) and one
stage bar for eval. They implement the domain's progress protocols (``execute.Progress``,
``evaluate.EvalProgress``) and are the only place that draws them."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text


def byte_progress(console: Console, verb: str, *, disable: bool = False) -> Progress:
    """A transient bar: verb, bar, bytes done/total, bytes/s, ETA, and the current tensor's name
    (tasks carry it as the ``tensor`` field; names are shown literally)."""
    return Progress(
        TextColumn(f"[bold]{verb}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tensor]}", style="dim", markup=False),
        console=console,
        transient=True,
        disable=disable,
    )


class MergeBar:
    """Renders the executor's progress (``execute.Progress``) as one byte bar with bytes/s and ETA."""

    def __init__(self, console: Console):
        self.bar = byte_progress(console, "merging")
        self.task: Any = None

    def start(self, total_bytes: int, total_tensors: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("merge", total=total_bytes, tensor="")

    def advance(self, nbytes: int) -> None:
        if self.task is not None:
            self.bar.advance(self.task, nbytes)

    def tensor_done(self, name: str) -> None:
        if self.task is not None:
            self.bar.update(self.task, tensor=name)

    def stop(self) -> None:
        self.bar.stop()


class EvalBar:
    """eval's progress (``evaluate.EvalProgress``): one transient bar per stage; notes are dim lines."""

    def __init__(self, console: Console):
        self.console = console
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task: Any = None

    def start(self, label: str, total: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.bar.start()
        self.task = self.bar.add_task(label, total=total)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def note(self, message: str) -> None:
        self.console.print(Text(message, style="dim"))

    def stop(self) -> None:
        self.bar.stop()
