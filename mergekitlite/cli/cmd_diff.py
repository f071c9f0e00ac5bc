"""``mergekitlite diff A B [--base BASE]``: arguments, the layer × module tables, --json and --png."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mergekitlite.cli.console import say, write_json
from mergekitlite.cli.labels import module_labels
from mergekitlite.errors import MergekitliteError

if TYPE_CHECKING:
    from mergekitlite.diff import DiffResult

SHOWN_SKIPPED = 20  # tensors that could not be compared, listed before "… and N more"


def add_diff_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="model A (folder or hub id)")
    p.add_argument("b", help="model B")
    p.add_argument("--base", metavar="MODEL", help="common base model: compare each model's delta from it")
    p.add_argument("--long", action="store_true", help="one row per tensor instead of a layer × module grid")
    p.add_argument(
        "--png",
        type=Path,
        metavar="PATH",
        help="write a heatmap (x = module, y = layer, embedding above and lm_head below; one panel per metric)",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write every tensor's numbers as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")


def format_value(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    if math.isinf(value):
        return "inf"
    return f"{value:.3g}"


def layer_tables(result: DiffResult) -> list[Table]:
    """One table per metric: rows = layers, columns = modules; then the tensors outside layers."""
    modules = result.modules()
    labels = module_labels(modules)
    tables = []
    for metric, title in result.metrics.items():
        table = Table(title=title, title_justify="left")
        table.add_column("layer", justify="right", style="bold")
        for m in modules:
            table.add_column(Text(labels[m]), justify="right")
        for label, row in zip(result.layers(), result.grid(metric), strict=True):
            table.add_row(Text(label), *(format_value(v) for v in row))
        tables.append(table)
    others = result.others()
    if others:
        table = Table(title="outside the layers", title_justify="left")
        table.add_column("tensor")
        for title in result.metrics.values():
            table.add_column(title, justify="right")
        for t in others:
            table.add_row(Text(t.name), *(format_value(getattr(t, m)) for m in result.metrics))
        tables.append(table)
    return tables


def long_table(result: DiffResult) -> Table:
    """One row per tensor."""
    table = Table()
    for col in ("layer", "module", "elements"):
        table.add_column(col, justify="right" if col != "module" else "left")
    for title in result.metrics.values():
        table.add_column(title, justify="right")
    for t in result.tensors:
        table.add_row(
            Text(t.layer or ""),
            Text(t.module),
            f"{t.numel:,}",
            *(format_value(getattr(t, m)) for m in result.metrics),
        )
    return table


def cmd_diff(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.cli.progress import byte_progress
    from mergekitlite.diff import diff_bytes, diff_models, open_model

    a, b = open_model(args.a), open_model(args.b)
    base = open_model(args.base) if args.base else None
    progress = byte_progress(console, "comparing", disable=args.quiet)
    with progress:
        task = progress.add_task("diff", total=diff_bytes(a, b, base), tensor="")
        result = diff_models(
            a, b, base, on_tensor=lambda name, nbytes: progress.update(task, advance=nbytes, tensor=name)
        )
    if not result.tensors:
        raise MergekitliteError(f"{args.a} and {args.b} have no tensor in common that can be compared")
    say(console, f"A = {result.a}\nB = {result.b}" + (f"\nbase = {result.base}" if result.base else ""))
    if result.identical():
        say(console, "identical: every compared tensor " + ("has a zero delta" if result.base else "is equal"), "green")
    for table in [long_table(result)] if args.long else layer_tables(result):
        console.print(table)
    if result.skipped:
        say(console, f"not compared ({len(result.skipped)}):", "yellow")
        for line in result.skipped[:SHOWN_SKIPPED]:
            say(console, f"  {line}")
        if len(result.skipped) > SHOWN_SKIPPED:
            say(console, f"  … and {len(result.skipped) - SHOWN_SKIPPED} more (see --json)")
    if args.json:
        write_json(args.json, result.to_json())
        say(console, f"wrote {args.json}")
    if args.png:
        from mergekitlite.cli.heatmap import plot_heatmap

        plot_heatmap(result, args.png)
        say(console, f"wrote {args.png}")
    return 0
