"""Command line: ``merge RECIPE [OUT]`` and ``mergekitlite {merge,plan,validate,schema,methods}``.

Exit codes: 0 success, 2 a problem with the recipe, models or output that the message explains,
130 interrupted (the partial output is kept for ``--resume``), 1 anything unexpected (a bug).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from mergekitlite.budget import human, parse_size
from mergekitlite.errors import MergekitliteError
from mergekitlite.progress import byte_progress

if TYPE_CHECKING:  # the commands import torch-heavy modules only when they run
    from mergekitlite.api import MergeOptions
    from mergekitlite.recipe import LoadedRecipe
    from mergekitlite.taskgraph import Plan

SCHEMA_PATH = Path("schemas/recipe.schema.json")


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class RichProgress:
    """Renders executor progress as one rich bar with bytes/s and ETA."""

    def __init__(self, console: Console):
        self.bar = byte_progress(console, "merging")
        self.task = None

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


def _add_merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="recipe YAML (mergekit format)")
    p.add_argument(
        "out", nargs="?", type=Path, help="output folder (default: recipe 'output', else merged/<recipe name>)"
    )
    p.add_argument("--dry-run", action="store_true", help="validate and plan, print the plan, write nothing")
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge from OUT.partial")
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists (after the new merge is complete)"
    )
    p.add_argument("--device", default="cpu", help="where to compute: cpu (default), cuda, cuda:1, mps, auto")
    p.add_argument("--shard-size", type=size_arg, default="5GB", help="maximum output shard size (default 5GB)")
    p.add_argument(
        "--max-ram", type=size_arg, help="RAM the whole process may use, e.g. 32GB (default: a quarter of what is free)"
    )
    p.add_argument(
        "--max-vram", type=size_arg, help="GPU memory for the arithmetic, e.g. 8GB (default: 80%% of what is free)"
    )
    p.add_argument("--random-seed", type=int, help="seed for random methods such as DARE (overrides the recipe)")
    p.add_argument(
        "--compute-dtype",
        choices=["float32", "float64", "bfloat16", "float16"],
        help="override the recipe's compute_dtype (default float32)",
    )
    p.add_argument("-j", "--threads", type=int, help="chunks merged in parallel (default: one per core)")
    p.add_argument("--no-hash", action="store_true", help="do not record sha256 of the inputs in the model card")
    p.add_argument(
        "--no-native",
        action="store_true",
        help="compute linear methods with torch ops instead of the fused native kernel (same bits, slower)",
    )
    p.add_argument(
        "--intermediate-dir", type=Path, help="where named steps of a multi-step recipe go (default OUT.steps/)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    _add_mergekit_args(p)


# mergekit-yaml's options that need nothing here, and why: commands copied from model cards run as they are.
MERGEKIT_NO_OPS = {
    "allow_crimes": "tensors are matched by name and shape; there is no architecture check to override",
    "lazy_unpickle": ".bin inputs are always read lazily",
    "low_cpu_memory": "memory is bounded by --max-ram / --max-vram",
    "read_to_gpu": "chunks are read on the host and computed on --device",
    "multi_gpu": "one device computes (--device)",
    "async_write": "writing always overlaps the arithmetic",
    "clone_tensors": "every output tensor is written from its own bytes",
    "safe_serialization": "the output is always safetensors",
    "trust_remote_code": "merging runs no model code",
    "write_model_card": "the model card (recipe, input hashes) is always written",
}
# ... and those that have no equivalent, with what to do instead.
MERGEKIT_UNSUPPORTED = {
    "transformers_cache": "set HF_HUB_CACHE=DIR instead",
    "lora_merge_cache": "LoRA inputs (model+adapter) are not supported: merge the adapter into its model first",
    "lora_merge_dtype": "LoRA inputs (model+adapter) are not supported: merge the adapter into its model first",
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _add_mergekit_args(p: argparse.ArgumentParser) -> None:
    quiet_ones = ", ".join(_flag(d) for d in MERGEKIT_NO_OPS)
    g = p.add_argument_group(
        "mergekit-yaml options",
        f"accepted so that mergekit commands run unchanged; {quiet_ones} and -v are accepted too and change nothing",
    )
    g.add_argument("--cuda", action="store_true", help="same as --device cuda")
    g.add_argument("--gpu-rich", action="store_true", help="same as --device cuda")
    g.add_argument(
        "--out-shard-size",
        type=size_arg,
        metavar="N",
        help="parameters per output shard, mergekit's unit (e.g. 1B); --shard-size counts bytes",
    )
    g.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=True, help="(default)")
    g.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false", help="write no tokenizer files")
    g.add_argument("--num-threads", type=int, metavar="N", help="same as -j")
    g.add_argument("--write-threads", type=int, metavar="N", help=argparse.SUPPRESS)
    g.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    for dest in MERGEKIT_NO_OPS:
        g.add_argument(_flag(dest), dest=dest, action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--no-write-model-card", dest="write_model_card", action="store_true", help=argparse.SUPPRESS)
    for dest in MERGEKIT_UNSUPPORTED:
        g.add_argument(_flag(dest), dest=dest, metavar="X", help=argparse.SUPPRESS)


def mergekit_notes(args: argparse.Namespace) -> list[str]:
    """One line per mergekit-yaml option given that changes nothing here."""
    given = [(dest, why) for dest, why in MERGEKIT_NO_OPS.items() if getattr(args, dest)]
    return [f"{_flag(dest)} has no effect: {why}" for dest, why in given]


def _options(args: argparse.Namespace) -> MergeOptions:
    from mergekitlite.api import MergeOptions

    for dest, instead in MERGEKIT_UNSUPPORTED.items():
        if getattr(args, dest) is not None:
            raise MergekitliteError(f"{_flag(dest)} (a mergekit-yaml option): {instead}")
    device = args.device
    if (args.cuda or args.gpu_rich) and device == "cpu":
        device = "cuda"
    return MergeOptions(
        device=device,
        shard_size=args.shard_size,
        shard_params=args.out_shard_size,
        copy_tokenizer=args.copy_tokenizer,
        compute_dtype=args.compute_dtype,
        max_ram=args.max_ram,
        max_vram=args.max_vram,
        random_seed=args.random_seed,
        resume=args.resume,
        overwrite=args.overwrite,
        threads=args.threads or args.num_threads,
        hash_inputs=not args.no_hash,
        native=not args.no_native,
        intermediate_dir=args.intermediate_dir,
    )


def _print_warnings(console: Console, warnings: Sequence[str]) -> None:
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)


def _plan_table(plan: Plan, console: Console, show_tensors: bool) -> None:
    summary = Table(title=f"plan: {plan.recipe.merge_method}", show_header=False)
    summary.add_row("models", ", ".join(plan.sources))
    summary.add_row("tensors", str(len(plan.tasks)))
    summary.add_row("read", human(plan.bytes_read))
    summary.add_row("written", f"{human(plan.bytes_written)} in {len(plan.shards)} shard(s)")
    summary.add_row("compute dtype", plan.compute_dtype)
    summary.add_row("estimated peak RAM (whole process)", human(plan.estimated_peak()))
    if plan.budget.on_gpu:
        summary.add_row("estimated peak VRAM", human(plan.estimated_peak_vram()))
    summary.add_row("config from", plan.config_donor)
    summary.add_row("tokenizer, chat template, generation config from", plan.tokenizer_donor)
    console.print(summary)
    if show_tensors:
        t = Table(title="tensors")
        for col in ("tensor", "method", "inputs", "params", "dtype", "rows/chunk", "working set", "shard"):
            t.add_column(col)
        for task in plan.tasks:
            params = ", ".join(f"{k}={_fmt_param(v)}" for k, v in task.params)
            t.add_row(
                task.name,
                task.why or task.method,
                ", ".join(i.model for i in task.inputs),
                params,
                task.out_dtype,
                f"{task.chunk_rows}/{task.rows}",
                human(plan.task_working_set(task)[0]),
                plan.shard_of[task.name],
            )
        console.print(t)


def _fmt_param(v: object) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(_fmt_param(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _plan_steps(
    steps: list[LoadedRecipe],
    out: Path,
    options: MergeOptions,
    console: Console,
    show_tensors: bool,
    quiet: bool = False,
) -> list[Plan | None]:
    """Plan every step whose inputs exist; later steps of a pipeline can only be planned once
    the steps they use have run."""
    from mergekitlite.api import plan_merge, step_outputs, waiting_for

    where = step_outputs(steps, out, options) if len(steps) > 1 else {}
    plans = []
    for i, step in enumerate(steps):
        if len(steps) > 1 and not quiet:
            console.rule(f"step {i + 1}/{len(steps)}: {step.recipe.name or 'final'}")
        missing = waiting_for(step, where)
        if missing:
            if not quiet:
                console.print(f"[dim]planned when {', '.join(missing)} exist(s) (made by an earlier step)[/]")
            plans.append(None)
            continue
        plan = plan_merge(step, options, aliases=where)
        plans.append(plan)
        if not quiet:
            _print_warnings(console, plan.warnings)
            _plan_table(plan, console, show_tensors=show_tensors)
    return plans


def cmd_merge(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.api import default_output, run_merge
    from mergekitlite.recipe import load_recipes

    steps = load_recipes(args.recipe)
    options = _options(args)
    for note in mergekit_notes(args):
        console.print(f"[dim]note: {note}[/]", highlight=False)
    out = args.out or default_output(steps[-1])
    if args.dry_run:
        _plan_steps(steps, out, options, console, show_tensors=False)
        console.print("[dim]dry run: nothing written[/]")
        return 0
    plans = _plan_steps(steps, out, options, console, show_tensors=False, quiet=True)
    if not args.quiet:
        for plan in plans:
            if plan is not None:
                _print_warnings(console, plan.warnings)
    progress = RichProgress(console) if not args.quiet else None

    def on_step(i: int, n: int, step: LoadedRecipe, dest: Path) -> None:
        if not args.quiet:
            console.print(f"[bold]step {i + 1}/{n}[/] {step.recipe.name or 'final'} → {dest}", highlight=False)

    try:
        result = run_merge(
            steps, out, options, progress=progress, plan=plans[0] if len(steps) == 1 else None, on_step=on_step
        )
    except KeyboardInterrupt:
        if progress:
            progress.stop()
        console.print(f"[red]interrupted[/]: continue with: merge {args.recipe} {out} --resume")
        return 130
    finally:
        if progress:
            progress.stop()
    if not args.quiet:
        for step in result.steps:
            state = "up to date" if step.up_to_date else f"{step.tensors_merged} tensors in {step.seconds:.1f} s"
            console.print(f"step result {step.output}: {state}", highlight=False)
        _print_warnings(console, result.notes)
        table = Table(show_header=False, title="merged")
        table.add_row("output", str(result.output))
        resumed = f" (+{result.tensors_resumed} resumed)" if result.tensors_resumed else ""
        table.add_row("tensors", f"{result.tensors_merged}{resumed}")
        table.add_row("written", human(result.plan.bytes_written))
        table.add_row("time", f"{result.seconds:.1f} s")
        table.add_row("peak memory (RSS)", human(result.peak_rss_bytes))
        console.print(table)
    return 0


def _plan_json(plan: Plan) -> dict[str, Any]:
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


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.api import MergeOptions, default_output, plan_merge, step_outputs, waiting_for
    from mergekitlite.recipe import load_recipes

    opts = MergeOptions(shard_size=args.shard_size, device=args.device, max_ram=args.max_ram, max_vram=args.max_vram)
    steps = load_recipes(args.recipe)
    if not args.json:
        _plan_steps(steps, default_output(steps[-1]), opts, console, show_tensors=args.tensors)
        return 0
    # JSON on stdout and nothing else (warnings go inside it), so that it can be piped.
    if len(steps) == 1:
        print(json.dumps(_plan_json(plan_merge(steps[0], opts)), indent=2))
        return 0
    where = step_outputs(steps, default_output(steps[-1]), opts)
    out = []
    for step in steps:
        missing = waiting_for(step, where)
        plan = None if missing else _plan_json(plan_merge(step, opts, aliases=where))
        out.append({"name": step.recipe.name, "plan": plan, "waits_for": missing})
    print(json.dumps({"steps": out}, indent=2))
    return 0


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.recipe import load_recipes

    failed = 0
    for path in args.recipes:
        try:
            steps = load_recipes(path)
        except MergekitliteError as exc:
            failed += 1
            console.print(str(exc), style="red", highlight=False, markup=False)
            continue
        for step in steps:
            _print_warnings(console, step.warnings)
        console.print(f"{path}: ok" + (f" ({len(steps)} steps)" if len(steps) > 1 else ""), highlight=False)
    return 2 if failed else 0


def cmd_schema(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.recipe import recipe_json_schema

    text = json.dumps(recipe_json_schema(), indent=2, ensure_ascii=False) + "\n"
    target: Path = args.output
    if args.check:
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current != text:
            console.print(f"{target} is stale: run `mergekitlite schema` to regenerate it", style="red")
            return 1
        console.print(f"{target} is up to date")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    console.print(f"wrote {target}")
    return 0


def cmd_methods(args: argparse.Namespace, console: Console) -> int:
    from mergekitlite.methods import REGISTRY

    table = Table(title="merge methods")
    for col in ("method", "base", "parameters (per model*)", "what it does"):
        table.add_column(col)
    for name in sorted(REGISTRY.methods):
        spec = REGISTRY.methods[name]
        params = ", ".join(
            f"{p.name}{'*' if p.per_model else ''}" + ("" if p.required else f"={p.default}") for p in spec.params
        )
        table.add_row(name + (f" ({', '.join(spec.aliases)})" if spec.aliases else ""), spec.base, params, spec.summary)
    console.print(table)
    return 0


def _run(handler: Callable[[argparse.Namespace, Console], int], args: argparse.Namespace) -> int:
    # soft_wrap: a message stays on one line whatever the width, so that `file:line:col: ...`
    # lines remain parseable by editors and CI logs.
    console = Console(stderr=False, quiet=getattr(args, "quiet", False), soft_wrap=True)
    errors = Console(stderr=True, soft_wrap=True)
    try:
        return handler(args, console)
    except MergekitliteError as exc:
        errors.print(f"error: {exc}", style="red", highlight=False, markup=False)
        return 2
    except KeyboardInterrupt:
        errors.print("interrupted", style="red")
        return 130


def merge_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="merge", description="Merge models as a recipe says (mergekit YAML format).")
    _add_merge_args(parser)
    args = parser.parse_args(argv)
    return _run(cmd_merge, args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mergekitlite", description="YAML-recipe driven model merging.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="run a recipe (same as the `merge` command)")
    _add_merge_args(p)
    p.set_defaults(handler=cmd_merge)

    p = sub.add_parser("plan", help="validate a recipe and show what the merge will do, from headers only")
    p.add_argument("recipe", type=Path)
    p.add_argument("--tensors", action="store_true", help="list every output tensor")
    p.add_argument("--json", action="store_true", help="machine-readable plan on stdout")
    p.add_argument("--shard-size", type=size_arg, default="5GB")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-ram", type=size_arg)
    p.add_argument("--max-vram", type=size_arg)
    p.set_defaults(handler=cmd_plan)

    p = sub.add_parser("validate", help="check recipe files without opening any model")
    p.add_argument("recipes", nargs="+", type=Path)
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("schema", help="write the recipe JSON schema (for editors and CI)")
    p.add_argument("--output", type=Path, default=SCHEMA_PATH)
    p.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    p.set_defaults(handler=cmd_schema)

    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.set_defaults(handler=cmd_methods)

    from mergekitlite.tools_cli import add_commands

    add_commands(sub)
    from mergekitlite.evolve.cli import add_command as add_evolve

    add_evolve(sub)

    args = parser.parse_args(argv)
    return _run(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
