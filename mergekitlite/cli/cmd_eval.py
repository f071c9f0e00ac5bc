"""``mergekitlite eval OUT --against MODEL ...``: arguments, then the results and generations as tables
that fit the terminal (models are shown by short unique labels, with a legend of their paths)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mergekitlite.cli.console import say
from mergekitlite.cli.flags import add_option_flags, count_arg, option_values
from mergekitlite.cli.labels import path_labels
from mergekitlite.evaluate.options import EvalOptions, LoadOptions

if TYPE_CHECKING:
    from mergekitlite.evaluate.report import EvalReport


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the merged model (folder or hub id)")
    p.add_argument("--against", nargs="+", default=[], metavar="MODEL", help="parents to compare with")
    add_option_flags(p, EvalOptions)
    p.add_argument("--show", type=int, default=3, metavar="N", help="generations shown side by side (default 3)")
    p.add_argument(
        "--show-chars", type=count_arg, default=200, metavar="N", help="characters shown per generation (default 200)"
    )
    add_option_flags(p, LoadOptions)
    p.add_argument(
        "-j",
        "--threads",
        type=count_arg,
        metavar="N",
        help="CPU threads for the forward passes (default: 1 for models under 100M parameters, where a thread "
        "pool only slows a busy machine down; else torch's choice)",
    )
    p.add_argument(
        "--report", type=Path, metavar="PATH", help="write PATH.md and PATH.json (or only PATH if it ends in .md/.json)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")


def eval_options(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(**option_values(EvalOptions, args), load=LoadOptions(**option_values(LoadOptions, args)))


# ------------------------------------------------------------------------------------------ tables


def results_table(report: EvalReport, labels: dict[str, str]) -> Table:
    from mergekitlite.evaluate.report import COLUMNS, row_cells

    s = report.settings
    caption = f"end token {s['end_token']!r} (id {s['end_token_id']}); chat template: {s['chat_template_from']}"
    table = Table(
        title=Text(f"eval: {report.merged}"), title_justify="left", caption=Text(caption), caption_justify="left"
    )
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("model", "role") else "right", no_wrap=col == "model")
    for r in report.models:
        cells = row_cells(r)
        cells[0] = labels[r.name]
        table.add_row(*(Text(cell) for cell in cells))  # Text: names and answers are not rich markup
    return table


def legend(report: EvalReport, labels: dict[str, str]) -> Table | None:
    """label → full name, when a label is shorter than its name."""
    if all(labels[r.name] == r.name for r in report.models):
        return None
    table = Table(show_header=False, box=None, padding=(0, 1), title="models", title_justify="left")
    table.add_column(no_wrap=True, style="bold")
    table.add_column()
    for name in dict.fromkeys(r.name for r in report.models):
        table.add_row(Text(labels[name]), Text(name))
    return table


def generations_table(report: EvalReport, labels: dict[str, str], show: int, chars: int) -> Table | None:
    from mergekitlite.evaluate.report import clip, shown

    if show <= 0 or not report.models or not report.models[0].generations:
        return None
    table = Table(
        title=f"generations (first {show}, greedy; ⏹ = ended its turn)", title_justify="left", show_lines=True
    )
    table.add_column("prompt")
    for r in report.models:
        table.add_column(Text(labels[r.name]))
    for i, g in enumerate(report.models[0].generations[:show]):
        table.add_row(Text(clip(g.prompt, chars)), *(Text(shown(r.generations[i], chars)) for r in report.models))
    return table


# ------------------------------------------------------------------------------------------ command


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.cli.progress import EvalBar
    from mergekitlite.evaluate.loading import (
        check_device,
        default_eval_threads,
        open_models,
        set_threads,
        transformers_progress_bars,
    )
    from mergekitlite.evaluate.report import write_report
    from mergekitlite.evaluate.run import run_eval

    options = eval_options(args)
    check_device(options.load)
    models = open_models(args.out, args.against)  # once: for the thread count and for run_eval
    threads = args.threads or default_eval_threads(models)
    if threads:
        set_threads(threads)
    progress = EvalBar(console) if not args.quiet else None
    try:
        with transformers_progress_bars(not args.quiet):
            report = run_eval(args.out, args.against, options, progress, models)
    finally:
        if progress is not None:
            progress.stop()
    labels = path_labels([r.name for r in report.models])
    console.print(results_table(report, labels))
    names = legend(report, labels)
    if names is not None:
        console.print(names)
    gens = generations_table(report, labels, args.show, args.show_chars)
    if gens is not None:
        console.print(gens)
    if args.report:
        for path in write_report(report, args.report, args.show, args.show_chars):
            say(console, f"wrote {path}")
    return 0
