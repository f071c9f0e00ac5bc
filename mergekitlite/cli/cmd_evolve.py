"""``mergekitlite evolve SPEC`` and ``mergekitlite evolve-schema``: the argparse side of the search
(``mergekitlite/evolve/`` computes). Handlers take ``(args, console)`` and return the exit code, like every
other command (errors the user can fix are MergekitliteErrors: exit 2)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from mergekitlite.cli.flags import arg_type, count_arg
from mergekitlite.options import positive, size

size_arg = arg_type(size, positive)

# Where `evolve-schema` writes by default (the search modules import torch: they are imported when a command runs).
SCHEMA_FILE = Path("schemas/search.schema.json")


def _duration(text: str) -> float:
    from mergekitlite.evolve.spec import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class RichSearchProgress:
    """One bar: trials finished (over the whole study) of the budget, the best score so far, elapsed time, ETA."""

    def __init__(self, console: Console):
        self.console = console
        self.bar = Progress(
            TextColumn("[bold]evolve"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("trials"),
            TextColumn("best {task.fields[best]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task: Any = None

    @staticmethod
    def _best(best: float | None) -> str:
        return "—" if best is None else f"{best:.4g}"

    def start(self, total: int | None, done: int, best: float | None) -> None:
        self.bar.start()
        self.task = self.bar.add_task("evolve", total=total, completed=done, best=self._best(best))

    def update(self, done: int, best: float | None) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=done, best=self._best(best))

    def note(self, message: str) -> None:
        self.console.print(Text(message, style="dim"), highlight=False)

    def stop(self) -> None:
        self.bar.stop()


def _space_table(search: Any) -> Table:
    table = Table(title=f"search space of {search.study_name}", title_justify="left")
    for col in ("parameter", "range", "baseline"):
        table.add_column(col)
    for d in search.space.dimensions:
        table.add_row(Text(d.name), Text(d.describe()), Text(str(d.baseline())))
    return table


def _result_table(search: Any) -> Table:
    from mergekitlite.evolve.report import trial_rows

    names = [t.label for t in search.loaded.spec.objective]
    table = Table(title=f"best trials of study {search.study_name}", title_justify="left")
    for col in ("rank", "trial", "score", *names, "role"):
        table.add_column(col, justify="left" if col in ("role",) else "right")
    for r in [r for r in trial_rows(search) if r["state"] == "complete"][:5]:
        cells = [f"{r['metrics'].get(n, float('nan')):.4g}" for n in names]
        table.add_row(str(r["rank"]), str(r["trial"]), f"{r['score']:.4g}", *cells, r["role"])
    return table


def _holdout_table(search: Any) -> Table | None:
    """One row per held-out metric, one column per measured trial (best, baseline): fits a narrow terminal."""
    if not search.holdout:
        return None
    from mergekitlite.evolve import study as studies

    best = search.study.best_trial.number
    base = studies.baseline_trial(search.study)
    table = Table(title="held out (never optimised)", title_justify="left")
    table.add_column("metric")
    numbers = sorted(search.holdout, key=lambda n: n != best)
    for number in numbers:
        role = "best" if number == best else "baseline" if base is not None and number == base.number else ""
        table.add_column(f"trial {number} ({role})", justify="right")
    table.add_row("held-out score", *(f"{search.holdout[n]['score']:.4g}" for n in numbers))
    for t in search.loaded.spec.holdout:
        table.add_row(Text(t.label), *(f"{search.holdout[n][t.label]:.4g}" for n in numbers))
    return table


def cmd_evolve(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.evolve.search import SearchOptions, prepare_search, run_search
    from mergekitlite.evolve.spec import load_search

    loaded = load_search(args.spec)
    options = SearchOptions(
        output=args.output,
        storage=args.storage,
        study_name=args.study_name,
        trials=args.trials,
        wall_time=args.wall_time,
        jobs=args.jobs,
        max_ram=args.max_ram,
        ray=args.ray,
        ray_cpus_per_trial=args.ray_cpus_per_trial,
        max_retries=args.max_retries,
        device=args.device,
        work_dir=args.work_dir,
        heartbeat=args.heartbeat,
        seed=args.seed,
    )
    if args.dry_run:
        search = prepare_search(loaded, options)
        console.print(_space_table(search))
        w = search.workers
        where = f"Ray cluster {args.ray}" if args.ray else f"{w.count} local worker(s) × {w.threads} thread(s)"
        console.print(f"trials would run on {where}; results in {search.output}; study {search.storage_url}")
        return 0
    progress = RichSearchProgress(console) if not args.quiet else None
    search = run_search(loaded, options, progress)
    from mergekitlite.evolve.report import write_reports

    written = write_reports(search)
    console.print(_result_table(search))
    held = _holdout_table(search)
    if held is not None:
        console.print(held)
    console.print(f"this run started {search.new_trials} trial(s) of study {search.study_name!r}", highlight=False)
    for path in written:
        console.print(f"wrote {path}", highlight=False)
    if args.merge_best:
        from mergekitlite.api import MergeOptions, run_merge
        from mergekitlite.recipe import load_recipe

        result = run_merge(load_recipe(written[0]), args.merge_best, MergeOptions(overwrite=True))
        console.print(f"merged the best recipe into {result.output}", highlight=False)
    return 0


def cmd_evolve_schema(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.evolve.spec import search_json_schema

    text = json.dumps(search_json_schema(), indent=2, ensure_ascii=False) + "\n"
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
        if current != text:
            console.print(f"{args.output} is stale: run `mergekitlite evolve-schema`", highlight=False)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    console.print(f"wrote {args.output}", highlight=False)
    return 0


def add_evolve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", type=Path, help="search spec YAML (schemas/search.schema.json)")
    p.add_argument("--output", type=Path, help="results folder (default: the spec's output, else evolve/<name>)")
    p.add_argument("--storage", help="optuna storage URL (default: sqlite:///<output>/study.db); share it to share")
    p.add_argument("--study-name", help="study name (default: the spec's name)")
    p.add_argument("--trials", type=count_arg, help="finished trials the study should have (overrides budget.trials)")
    p.add_argument("--wall-time", type=_duration, help="stop starting trials after this long, e.g. 10m")
    p.add_argument("-j", "--jobs", type=count_arg, help="local trials at once, at most (default: cores and --max-ram)")
    p.add_argument(
        "--max-ram",
        type=size_arg,
        help="local: RAM for all trials together (default: half of what is free); "
        "with --ray: per trial (a Ray memory resource)",
    )
    p.add_argument("--ray", metavar="auto|ADDRESS", help="run each trial as a task on this Ray cluster")
    p.add_argument("--ray-cpus-per-trial", type=float, default=1.0, help="CPUs Ray reserves per trial (default 1)")
    p.add_argument("--max-retries", type=int, default=2, help="re-runs of a trial whose worker died (default 2)")
    p.add_argument("--device", default="cpu", help="where trials merge and measure: cpu (default), cuda, auto")
    p.add_argument("--work-dir", type=Path, help="where trials merge (default: the system's temporary folder)")
    p.add_argument("--heartbeat", type=int, default=10, help="seconds between heartbeats of running trials")
    p.add_argument("--seed", type=int, help="sampler seed (overrides the spec's)")
    p.add_argument("--merge-best", type=Path, metavar="OUT", help="merge the best recipe into OUT at the end")
    p.add_argument("--dry-run", action="store_true", help="validate the spec, resolve models, show the space")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def add_evolve_schema_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", type=Path, default=SCHEMA_FILE)
    p.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
