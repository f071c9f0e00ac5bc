"""``merge RECIPE [OUT]`` and ``mergekitlite plan RECIPE``: both take the planning options declared on
``MergeOptions``, so ``plan`` estimates what ``merge`` with the same flags will do."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mergekitlite.budget import human
from mergekitlite.cli.console import note, say, warn
from mergekitlite.cli.flags import add_option_flags, option_values
from mergekitlite.cli.mergekit import add_mergekit_group, apply_mergekit_flags, mergekit_notes
from mergekitlite.options import MERGEKIT_GROUP, MergeOptions

if TYPE_CHECKING:  # the commands import torch-heavy modules only when they run
    from mergekitlite.api import StepPlan
    from mergekitlite.recipe import LoadedRecipe
    from mergekitlite.taskgraph import Plan


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="recipe YAML (mergekit format)")
    p.add_argument(
        "out", nargs="?", type=Path, help="output folder (default: recipe 'output', else merged/<recipe name>)"
    )
    p.add_argument("--dry-run", action="store_true", help="validate and plan, print the plan, write nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    add_option_flags(p, MergeOptions, groups={MERGEKIT_GROUP: add_mergekit_group(p)})


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path)
    p.add_argument("--tensors", action="store_true", help="list every output tensor")
    p.add_argument("--json", action="store_true", help="machine-readable plan on stdout")
    add_option_flags(p, MergeOptions, planning_only=True)


def merge_options(args: argparse.Namespace) -> MergeOptions:
    values = option_values(MergeOptions, args)
    if hasattr(args, "cuda"):  # merge: mergekit-yaml's spellings too
        values = apply_mergekit_flags(args, values)
    return MergeOptions(**values)


# ------------------------------------------------------------------------------------------ showing plans


def plan_table(plan: Plan) -> Table:
    summary = Table(title=f"plan: {plan.recipe.merge_method}", show_header=False)
    summary.add_row("models", Text(", ".join(plan.sources)))
    summary.add_row("tensors", str(len(plan.tasks)))
    summary.add_row("read", human(plan.bytes_read))
    summary.add_row("written", f"{human(plan.bytes_written)} in {len(plan.shards)} shard(s)")
    summary.add_row("compute dtype", plan.compute_dtype)
    summary.add_row("estimated peak RAM (whole process)", human(plan.estimated_peak()))
    if plan.budget.on_gpu:
        summary.add_row("estimated peak VRAM", human(plan.estimated_peak_vram()))
    summary.add_row("config from", Text(plan.config_donor))
    summary.add_row("tokenizer, chat template, generation config from", Text(plan.tokenizer_donor))
    return summary


def tensors_table(plan: Plan) -> Table:
    t = Table(title="tensors")
    for col in ("tensor", "method", "inputs", "params", "dtype", "rows/chunk", "working set", "shard"):
        t.add_column(col)
    for task in plan.tasks:
        params = ", ".join(f"{k}={_fmt_param(v)}" for k, v in task.params)
        t.add_row(
            Text(task.name),
            Text(task.why or task.method),
            Text(", ".join(i.model for i in task.inputs)),
            Text(params),
            task.out_dtype,
            f"{task.chunk_rows}/{task.rows}",
            human(plan.task_working_set(task)[0]),
            Text(plan.shard_of[task.name]),
        )
    return t


def _fmt_param(v: object) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(_fmt_param(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def show_steps(console: Console, planned: Sequence[StepPlan], show_tensors: bool) -> None:
    """Each step's warnings and plan; a step that waits for earlier ones says so."""
    for step in planned:
        if step.count > 1:
            console.rule(Text(f"step {step.index + 1}/{step.count}: {step.name}"))
        if step.plan is None:
            say(console, f"planned when {', '.join(step.waits_for)} exist(s) (made by an earlier step)", "dim")
            continue
        warn(console, step.plan.warnings)
        console.print(plan_table(step.plan))
        if show_tensors:
            console.print(tensors_table(step.plan))


def plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "tensors": [
            {
                "name": t.name,
                "method": t.method,
                "inputs": [i.model for i in t.inputs],
                "params": {k: list(v) if isinstance(v, tuple) else v for k, v in t.params},
                "dtype": t.out_dtype,
                "shape": list(t.shape),
                "shard": plan.shard_of[t.name],
                "chunk_rows": t.chunk_rows,
                "working_set": plan.task_working_set(t)[0],
            }
            for t in plan.tasks
        ],
        "bytes_read": plan.bytes_read,
        "bytes_written": plan.bytes_written,
        "estimated_peak": plan.estimated_peak(),
        "shards": [s.filename for s in plan.shards],
        "warnings": list(plan.warnings),
    }


def steps_json(planned: Sequence[StepPlan]) -> dict[str, Any]:
    """A single step's plan as is; several: ``{"steps": [{name, plan, waits_for}]}``."""
    if len(planned) == 1 and planned[0].plan is not None:
        return plan_json(planned[0].plan)
    return {
        "steps": [
            {
                "name": step.recipe.recipe.name,
                "plan": None if step.plan is None else plan_json(step.plan),
                "waits_for": list(step.waits_for),
            }
            for step in planned
        ]
    }


# ------------------------------------------------------------------------------------------ commands


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.api import default_output, plan_steps
    from mergekitlite.recipe import load_recipes

    options = merge_options(args)
    steps = load_recipes(args.recipe, strict=options.strict)
    planned = plan_steps(steps, default_output(steps[-1]), options)
    if args.json:
        # JSON on stdout and nothing else (warnings go inside it), so that it can be piped.
        print(json.dumps(steps_json(planned), indent=2))
    else:
        show_steps(console, planned, show_tensors=args.tensors)
    return 0


def cmd_merge(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.api import default_output, plan_steps, run_merge
    from mergekitlite.cli.progress import MergeBar
    from mergekitlite.recipe import load_recipes

    options = merge_options(args)
    note(console, mergekit_notes(args))
    steps = load_recipes(args.recipe, strict=options.strict)
    out = args.out or default_output(steps[-1])
    planned = plan_steps(steps, out, options)
    if args.dry_run:
        show_steps(console, planned, show_tensors=False)
        say(console, "dry run: nothing written", "dim")
        return 0
    for step in planned:
        if step.plan is not None:
            warn(console, step.plan.warnings)
    progress = MergeBar(console) if not args.quiet else None

    def on_step(i: int, n: int, step: LoadedRecipe, dest: Path) -> None:
        console.print(Text.assemble((f"step {i + 1}/{n}", "bold"), f" {step.recipe.name or 'final'} → {dest}"))

    try:
        result = run_merge(steps, out, options, progress=progress, on_step=on_step, planned=planned)
    except KeyboardInterrupt:
        if progress:
            progress.stop()
        console.print(Text.assemble(("interrupted", "red"), f": continue with: merge {args.recipe} {out} --resume"))
        return 130
    finally:
        if progress:
            progress.stop()
    for step_result in result.steps:
        state = (
            "up to date"
            if step_result.up_to_date
            else f"{step_result.tensors_merged} tensors in {step_result.seconds:.1f} s"
        )
        say(console, f"step result {step_result.output}: {state}")
        warn(console, step_result.notes)
    warn(console, result.notes)
    table = Table(show_header=False, title="merged")
    table.add_row("output", Text(str(result.output)))
    resumed = f" (+{result.tensors_resumed} resumed)" if result.tensors_resumed else ""
    table.add_row("tensors", f"{result.tensors_merged}{resumed}")
    table.add_row("written", human(result.plan.bytes_written))
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("peak memory (RSS)", human(result.peak_rss_bytes))
    console.print(table)
    return 0
