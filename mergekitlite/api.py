"""The Python API: ``plan_merge`` and ``run_merge`` tie recipe → plan → execute → artifacts together.

A recipe file may hold several merge steps (YAML documents separated by ``---``, mergekit-multi's
format); named steps are written to their own folders and later steps use them like any model.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mergekitlite.artifacts import InputHasher, default_cache_dir, hash_file, write_card, write_side_files
from mergekitlite.budget import Budget
from mergekitlite.errors import OptionError, RecipeError
from mergekitlite.execute import ExecContext, NullProgress, Progress, resolve_device, run_tasks
from mergekitlite.output import PartialOutput, input_files, lock_output, open_partial
from mergekitlite.plan import DEFAULT_SHARD_SIZE, build_plan
from mergekitlite.recipe import LoadedRecipe, load_recipes
from mergekitlite.taskgraph import Plan

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MergeOptions:
    device: str = "cpu"
    shard_size: int = DEFAULT_SHARD_SIZE
    shard_params: int | None = None  # parameters per shard instead (mergekit's --out-shard-size)
    compute_dtype: str | None = None  # overrides the recipe's compute_dtype
    max_ram: int | None = None  # bytes for the whole process; default: a share of what is free
    max_vram: int | None = None  # bytes of GPU memory for chunks; default: 80% of what is free
    random_seed: int | None = None  # overrides the recipe's random_seed
    resume: bool = False
    overwrite: bool = False
    threads: int | None = None  # chunk workers (default: one per core)
    hash_inputs: bool = True
    native: bool = True  # linear methods on the CPU in the fused kernel, when built (same bits)
    copy_tokenizer: bool = True  # False: no tokenizer files or chat template (mergekit's --no-copy-tokenizer)
    cache_dir: Path | None = None  # input-hash cache; default ~/.cache/mergekitlite
    intermediate_dir: Path | None = None  # named steps of multi-step recipes; default OUT.steps/

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"-j/--threads must be at least 1 (got {self.threads}); leave it out for one per core")


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


def _steps(recipe: str | Path | LoadedRecipe | list[LoadedRecipe]) -> list[LoadedRecipe]:
    if isinstance(recipe, LoadedRecipe):
        return [recipe]
    if isinstance(recipe, list):
        return recipe
    return load_recipes(recipe)


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
    steps = _steps(recipe)
    if len(steps) != 1:
        raise RecipeError([f"{steps[0].path}: has {len(steps)} steps; plan them with plan_steps"])
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


def step_outputs(steps: list[LoadedRecipe], out: Path, options: MergeOptions) -> dict[str, Path]:
    """Where each named step of a multi-step recipe writes: its ``output:``, else the
    intermediate folder; the last step writes to ``out``."""
    inter = options.intermediate_dir or out.with_name(out.name + ".steps")
    where: dict[str, Path] = {}
    for step in steps[:-1]:
        name = step.recipe.name
        assert name is not None  # enforced when the recipe was loaded
        where[name] = Path(step.recipe.output) if step.recipe.output else inter / name
    return where


def waiting_for(step: LoadedRecipe, where: Mapping[str, Path]) -> list[str]:
    """Earlier steps whose results ``step`` uses and that do not exist yet (it cannot be planned)."""
    return [r for r in step.recipe.referenced_models() if r in where and not where[r].is_dir()]


def peak_rss_bytes() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def _is_up_to_date(plan: Plan, out: Path) -> bool:
    try:
        recorded = json.loads((out / "mergekitlite.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return recorded.get("plan_fingerprint") == plan.fingerprint()


def run_merge(
    recipe: str | Path | LoadedRecipe | list[LoadedRecipe],
    out: str | Path | None = None,
    options: MergeOptions | None = None,
    progress: Progress | None = None,
    plan: Plan | None = None,
    on_step: Callable[[int, int, LoadedRecipe, Path], None] | None = None,
) -> MergeResult:
    """Merge as the recipe says into ``out`` (default: the recipe's ``output``, else
    ``merged/<recipe stem>``). Nothing named ``out`` exists until the merge is complete.

    Multi-step recipes run their steps in order; a named step whose output already matches its
    plan (same recipe, same inputs) is not merged again, so an interrupted pipeline resumes
    between steps."""
    opts = options or MergeOptions()
    steps = _steps(recipe)
    target = Path(out) if out is not None else default_output(steps[-1])
    if len(steps) == 1:
        return _run_step(steps[0], target, opts, progress, plan, aliases=None)
    where = step_outputs(steps, target, opts)
    done: list[MergeResult] = []
    for i, step in enumerate(steps):
        dest = where[step.recipe.name] if i < len(steps) - 1 and step.recipe.name else target
        if on_step:
            on_step(i, len(steps), step, dest)
        step_plan = plan_merge(step, opts, aliases=where)
        if i < len(steps) - 1 and _is_up_to_date(step_plan, dest):
            done.append(MergeResult(dest, step_plan, 0, 0, 0.0, peak_rss_bytes(), up_to_date=True))
            continue
        # An intermediate folder that no longer matches its recipe is simply remade.
        last = i == len(steps) - 1
        step_opts = opts if last else replace(opts, overwrite=True)
        done.append(_run_step(step, dest, step_opts, progress, step_plan, aliases=where, whole_file=last))
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
    device = resolve_device(opts.device)
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
    device: torch.device,
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
    ctx = ExecContext(device=device, progress=progress or NullProgress(), on_done=partial.record, native=opts.native)
    resumed = len(partial.done)
    merged = run_tasks(plan, partial.path, ctx, done=partial.done)

    side = write_side_files(plan, partial.path, copy_tokenizer=opts.copy_tokenizer)
    hashes = hasher.wait() if hasher else {}
    partial.verify_inputs(input_files(plan))
    # The final step of a multi-step recipe records every step: it needs all of them to be reproduced.
    write_card(
        plan,
        partial.path,
        hashes,
        name=partial.final.name,
        recipe_text=loaded.file_text if whole_file else None,
        side=side,
    )
    final = partial.commit(overwrite=opts.overwrite)
    return MergeResult(
        output=final,
        plan=plan,
        tensors_merged=merged,
        tensors_resumed=resumed,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        notes=tuple(side.notes) + tuple(hasher.notes if hasher else ()),
    )


def _stable_hashes(files: list[Path]) -> dict[str, tuple[str, str]]:
    """``file → (identity, sha256)`` outside the background hasher (with ``--no-hash``)."""
    found = {str(f): hash_file(f) for f in files}
    return {f: (ident, digest) for f, (ident, digest) in found.items() if ident is not None}
