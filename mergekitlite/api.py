"""The Python API: ``plan_merge`` and ``run_merge`` tie recipe → plan → execute → artifacts together.

A recipe file may hold several merge steps (YAML documents separated by ``---``, mergekit-multi's
format); named steps are written to their own folders and later steps use them like any model.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergekitlite.artifacts import InputHasher, default_cache_dir, hash_file, write_card, write_side_files
from mergekitlite.budget import Budget
from mergekitlite.errors import NonFiniteError, RecipeError
from mergekitlite.execute import ExecContext, NullProgress, Progress, merge_device, resolve_device, run_tasks
from mergekitlite.nonfinite import NonFinite, report_lines, strict_problem
from mergekitlite.options import MergeOptions
from mergekitlite.output import PartialOutput, input_files, lock_output, open_partial
from mergekitlite.plan import build_plan
from mergekitlite.recipe import LoadedRecipe, load_recipes
from mergekitlite.taskgraph import Plan
from mergekitlite.tokens import read_json_object

__all__ = [
    "MergeOptions",
    "MergeResult",
    "StepPlan",
    "default_output",
    "plan_merge",
    "plan_steps",
    "run_merge",
    "step_outputs",
]


@dataclass(frozen=True)
class MergeResult:
    output: Path
    plan: Plan
    tensors_merged: int
    tensors_resumed: int
    seconds: float
    peak_rss_bytes: int
    notes: tuple[str, ...] = field(default=())
    steps: tuple[MergeResult, ...] = ()  # earlier steps of a multi-step recipe (run or up to date)
    up_to_date: bool = False  # an intermediate step whose output already matched its plan
    nonfinite: Mapping[str, NonFinite] = field(default_factory=dict)  # tensor → NaN/±inf read and written


def _steps(recipe: str | Path | LoadedRecipe | list[LoadedRecipe], strict: bool = False) -> list[LoadedRecipe]:
    """The recipe's steps; a path is loaded (``strict``: warnings are errors)."""
    if isinstance(recipe, LoadedRecipe):
        return [recipe]
    if isinstance(recipe, list):
        return recipe
    return load_recipes(recipe, strict=strict)


def default_output(loaded: LoadedRecipe) -> Path:
    if loaded.recipe.output:
        return Path(loaded.recipe.output)
    stem = loaded.path.stem if loaded.path else "merge"
    return Path("merged") / stem


def plan_merge(
    recipe: str | Path | LoadedRecipe,
    options: MergeOptions | None = None,
    aliases: Mapping[str, Path] | None = None,
) -> Plan:
    """Validate a single-step recipe and plan the merge from the inputs' headers; reads no weights."""
    opts = options or MergeOptions()
    steps = _steps(recipe, opts.strict)
    if len(steps) != 1:
        raise RecipeError([f"{steps[0].path}: has {len(steps)} steps; plan them with mergekitlite.plan_steps"])
    # Planning for a GPU needs no GPU (``plan --device cuda`` on a laptop); only ``auto`` looks.
    on_gpu = not opts.device.startswith("cpu") and (opts.device != "auto" or resolve_device("auto").type != "cpu")
    budget = Budget(ram=opts.max_ram, vram=opts.max_vram, on_gpu=on_gpu)
    if opts.threads:
        budget = replace(budget, workers=opts.threads)
    return build_plan(
        steps[0],
        shard_size=opts.shard_size,
        shard_params=opts.shard_params,
        compute_dtype=opts.compute_dtype,
        budget=budget,
        random_seed=opts.random_seed,
        aliases=aliases,
    )


def step_outputs(steps: Sequence[LoadedRecipe], out: Path, options: MergeOptions) -> dict[str, Path]:
    """Where each named step of a multi-step recipe writes: its ``output:``, else the
    intermediate folder; the last step writes to ``out``."""
    inter = options.intermediate_dir or out.with_name(out.name + ".steps")
    where: dict[str, Path] = {}
    for step in steps[:-1]:
        name = step.recipe.name
        assert name is not None  # enforced when the recipe was loaded
        where[name] = Path(step.recipe.output) if step.recipe.output else inter / name
    return where


@dataclass(frozen=True)
class StepPlan:
    """One step of a recipe file, planned as far as it can be before anything runs."""

    index: int  # 0-based position in the file
    count: int  # steps in the file
    recipe: LoadedRecipe
    output: Path  # where the step writes
    uses: tuple[str, ...]  # earlier steps whose outputs are its inputs
    waits_for: tuple[str, ...]  # those of them not made yet: it cannot be planned before they run
    plan: Plan | None  # None exactly when ``waits_for`` is not empty

    @property
    def name(self) -> str:
        return self.recipe.recipe.name or "final"

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def plan_steps(
    recipe: str | Path | LoadedRecipe | list[LoadedRecipe],
    out: str | Path | None = None,
    options: MergeOptions | None = None,
) -> list[StepPlan]:
    """Plan every step of a recipe file (one or several ``---``-separated steps) from headers only.
    A step whose inputs are made by earlier steps that have not run yet gets no plan and says which
    steps it waits for; ``run_merge`` plans it once they have run."""
    opts = options or MergeOptions()
    steps = _steps(recipe, opts.strict)
    target = Path(out) if out is not None else default_output(steps[-1])
    where = step_outputs(steps, target, opts) if len(steps) > 1 else {}
    planned = []
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        uses = tuple(r for r in step.recipe.referenced_models() if r in where)
        waits = tuple(r for r in uses if not where[r].is_dir())
        plan = None if waits else plan_merge(step, opts, aliases=where or None)
        output = target if last else where[step.recipe.name or ""]
        planned.append(StepPlan(i, len(steps), step, output, uses, waits, plan))
    return planned


def peak_rss_bytes() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def _is_up_to_date(plan: Plan, out: Path) -> bool:
    recorded = read_json_object(out / "mergekitlite.json") or {}
    return recorded.get("plan_fingerprint") == plan.fingerprint()


def run_merge(
    recipe: str | Path | LoadedRecipe | list[LoadedRecipe],
    out: str | Path | None = None,
    options: MergeOptions | None = None,
    progress: Progress | None = None,
    plan: Plan | None = None,
    on_step: Callable[[int, int, LoadedRecipe, Path], None] | None = None,
    planned: Sequence[StepPlan] | None = None,
) -> MergeResult:
    """Merge as the recipe says into ``out`` (default: the recipe's ``output``, else
    ``merged/<recipe stem>``). Nothing named ``out`` exists until the merge is complete.

    Multi-step recipes run their steps in order; a named step whose output already matches its
    plan (same recipe, same inputs) is not merged again, so an interrupted pipeline resumes
    between steps. ``plan`` (a single-step recipe's) or ``planned`` (``plan_steps``' result for
    the same recipe, ``out`` and options): plans the caller has made already."""
    opts = options or MergeOptions()
    steps = _steps(recipe, opts.strict)
    target = Path(out) if out is not None else default_output(steps[-1])
    if planned is None and plan is not None and len(steps) == 1:
        planned = [StepPlan(0, 1, steps[0], target, (), (), plan)]
    if planned is None:
        planned = plan_steps(steps, target, opts)
    if len(planned) == 1:
        return _run_step(planned[0].recipe, target, opts, progress, planned[0].plan, aliases=None)
    where = step_outputs(steps, target, opts)
    done: list[MergeResult] = []
    for step in planned:
        if on_step:
            on_step(step.index, step.count, step.recipe, step.output)
        # A step that reads earlier steps' outputs is planned after they ran: a plan made before
        # read their previous outputs' headers, or none at all.
        step_plan = plan_merge(step.recipe, opts, aliases=where) if step.uses or step.plan is None else step.plan
        if not step.last and _is_up_to_date(step_plan, step.output):
            done.append(MergeResult(step.output, step_plan, 0, 0, 0.0, peak_rss_bytes(), up_to_date=True))
            continue
        # An intermediate folder that no longer matches its recipe is simply remade.
        step_opts = opts if step.last else replace(opts, overwrite=True)
        done.append(
            _run_step(step.recipe, step.output, step_opts, progress, step_plan, aliases=where, whole_file=step.last)
        )
    last = done[-1]
    return MergeResult(
        last.output,
        last.plan,
        last.tensors_merged,
        last.tensors_resumed,
        last.seconds,
        peak_rss_bytes(),
        last.notes,
        steps=tuple(done[:-1]),
        nonfinite=last.nonfinite,
    )


def _run_step(
    loaded: LoadedRecipe,
    target: Path,
    opts: MergeOptions,
    progress: Progress | None,
    plan: Plan | None,
    aliases: Mapping[str, Path] | None,
    whole_file: bool = False,
) -> MergeResult:
    started = time.perf_counter()
    device = merge_device(opts.device)
    plan = plan or plan_merge(loaded, opts, aliases=aliases)
    # One merge at a time into ``target``, from before its checks until after the rename.
    with lock_output(target) as lock:
        partial = open_partial(target, plan, resume=opts.resume, overwrite=opts.overwrite)
        try:
            result = _merge_into(partial, loaded, plan, opts, device, progress, whole_file, started)
        except OSError as exc:  # a full disk, an unwritable folder, an input made unreadable meanwhile...
            raise partial.explain(exc) from None
    if lock.supported:
        return result
    unlocked = f"the file system of {target.parent} has no file locks: nothing kept other merges out of {target}"
    return replace(result, notes=(*result.notes, unlocked))


def _merge_into(
    partial: PartialOutput,
    loaded: LoadedRecipe,
    plan: Plan,
    opts: MergeOptions,
    device: Any,
    progress: Progress | None,
    whole_file: bool,
    started: float,
) -> MergeResult:
    """Fill ``partial`` (tensors, side files, card), check that no input changed meanwhile, rename."""
    # Inputs that changed since the partial output was started must be hashed to prove them the same.
    changed = partial.needing_hashes()
    hasher = None
    if opts.hash_inputs:
        cache = (opts.cache_dir or default_cache_dir()) / "sha256.json"
        hasher = InputHasher(plan.sources, cache, on_weights=partial.record_hashes).start()
    else:
        partial.record_hashes(_stable_hashes(changed))
    ctx = ExecContext(
        device=device,
        progress=progress or NullProgress(),
        on_done=partial.record,
        native=opts.native,
        on_nonfinite=partial.record_nonfinite,
    )
    resumed = len(partial.done)
    merged = run_tasks(plan, partial.path, ctx, done=partial.done)

    side = write_side_files(plan, partial.path, copy_tokenizer=opts.copy_tokenizer)
    hashes = hasher.wait() if hasher else {}
    partial.verify_inputs(input_files(plan))
    found = dict(partial.nonfinite)
    _refuse_nonfinite(plan, partial, found, opts.strict)
    # The final step of a multi-step recipe records every step: it needs all of them to be reproduced.
    write_card(
        plan,
        partial.path,
        hashes,
        name=partial.final.name,
        recipe_text=loaded.file_text if whole_file else None,
        side=side,
        nonfinite=found,
    )
    final = partial.commit(overwrite=opts.overwrite)
    return MergeResult(
        output=final,
        plan=plan,
        tensors_merged=merged,
        tensors_resumed=resumed,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        notes=tuple(side.notes) + tuple(hasher.notes if hasher else ()) + tuple(_nonfinite_lines(plan, found)),
        nonfinite=found,
    )


def _nonfinite_where(plan: Plan) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """The plan's tensor order, each input model's path and each tensor's output dtype."""
    order = [t.name for t in plan.tasks]
    paths = {ref: str(src.path) for ref, src in plan.sources.items()}
    return order, paths, {t.name: t.out_dtype for t in plan.tasks}


def _nonfinite_lines(plan: Plan, found: Mapping[str, NonFinite]) -> list[str]:
    return report_lines(found, *_nonfinite_where(plan)) if found else []


def _refuse_nonfinite(plan: Plan, partial: PartialOutput, found: Mapping[str, NonFinite], strict: bool) -> None:
    """With ``--strict``, an output holding NaN/±inf is not finalised: it stays in ``OUT.partial``
    (its journal complete), where ``--resume`` without ``--strict`` would accept it."""
    problem = strict_problem(found, *_nonfinite_where(plan)) if strict and found else None
    if problem:
        raise NonFiniteError(f"{problem} (the merge is left in {partial.path})")


def _stable_hashes(files: list[Path]) -> dict[str, tuple[str, str]]:
    """``file → (identity, sha256)`` outside the background hasher (with ``--no-hash``)."""
    found = {str(f): hash_file(f) for f in files}
    return {f: (ident, digest) for f, (ident, digest) in found.items() if ident is not None}
