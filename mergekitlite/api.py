"""The Python API: ``plan_merge`` and ``run_merge`` tie recipe → plan → execute → artifacts together."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekitlite.artifacts import InputHasher, default_cache_dir, write_card, write_side_files
from mergekitlite.execute import ExecContext, NullProgress, Progress, resolve_device, run_tasks
from mergekitlite.output import open_partial
from mergekitlite.budget import Budget
from mergekitlite.plan import DEFAULT_SHARD_SIZE, Plan, build_plan
from mergekitlite.recipe import LoadedRecipe, load_recipe


@dataclass(frozen=True)
class MergeOptions:
    device: str = "cpu"
    shard_size: int = DEFAULT_SHARD_SIZE
    compute_dtype: str | None = None  # overrides the recipe's compute_dtype
    max_ram: int | None = None  # bytes for the whole process; default: a share of what is free
    max_vram: int | None = None  # bytes of GPU memory for chunks; default: 80% of what is free
    random_seed: int | None = None  # overrides the recipe's random_seed
    resume: bool = False
    overwrite: bool = False
    threads: int | None = None
    hash_inputs: bool = True
    cache_dir: Path | None = None  # input-hash cache; default ~/.cache/mergekitlite


@dataclass(frozen=True)
class MergeResult:
    output: Path
    plan: Plan
    tensors_merged: int
    tensors_resumed: int
    seconds: float
    peak_rss_bytes: int
    notes: tuple[str, ...] = field(default=())


def _loaded(recipe: str | Path | LoadedRecipe) -> LoadedRecipe:
    return recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)


def default_output(loaded: LoadedRecipe) -> Path:
    if loaded.recipe.output:
        return Path(loaded.recipe.output)
    stem = loaded.path.stem if loaded.path else "merge"
    return Path("merged") / stem


def plan_merge(recipe: str | Path | LoadedRecipe, options: MergeOptions | None = None) -> Plan:
    """Validate the recipe and plan the merge from the inputs' headers; reads no weights."""
    opts = options or MergeOptions()
    budget = Budget(ram=opts.max_ram, vram=opts.max_vram, on_gpu=not opts.device.startswith("cpu"))
    return build_plan(
        _loaded(recipe),
        shard_size=opts.shard_size,
        compute_dtype=opts.compute_dtype,
        budget=budget,
        random_seed=opts.random_seed,
    )


def peak_rss_bytes() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def run_merge(
    recipe: str | Path | LoadedRecipe,
    out: str | Path | None = None,
    options: MergeOptions | None = None,
    progress: Progress | None = None,
    plan: Plan | None = None,
) -> MergeResult:
    """Merge as the recipe says into ``out`` (default: the recipe's ``output``, else
    ``merged/<recipe stem>``). Nothing named ``out`` exists until the merge is complete."""
    opts = options or MergeOptions()
    started = time.perf_counter()
    loaded = _loaded(recipe)
    device = resolve_device(opts.device)
    plan = plan or plan_merge(loaded, opts)
    target = Path(out) if out is not None else default_output(loaded)
    partial = open_partial(target, plan, resume=opts.resume, overwrite=opts.overwrite)

    hasher = None
    if opts.hash_inputs:
        cache = (opts.cache_dir or default_cache_dir()) / "sha256.json"
        hasher = InputHasher(plan.sources, cache).start()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    ctx = ExecContext(device=device, progress=progress or NullProgress(), on_durable=partial.record)
    resumed = len(partial.done)
    merged = run_tasks(plan, partial.path, ctx, done=partial.done)

    notes = list(write_side_files(plan, partial.path))
    hashes = hasher.wait() if hasher else {}
    write_card(plan, partial.path, hashes, name=target.name)
    final = partial.commit(overwrite=opts.overwrite)
    return MergeResult(
        output=final,
        plan=plan,
        tensors_merged=merged,
        tensors_resumed=resumed,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        notes=tuple(notes),
    )
