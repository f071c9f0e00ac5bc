"""Micro-benchmark of the merge methods' arithmetic: statistic passes and merge pass, by method.

No I/O: a float32 base and ``--models`` fine-tunes (bf16-valued, as real checkpoints: many equal
magnitudes) sit in memory and are cut into row chunks the way the executor cuts them. For each
method it times the statistic passes (``compute_stats``) and the merge pass (every chunk through
the method), single-threaded, then with a pool of ``--workers`` threads: the statistic passes
through ``compute_stats(pool=...)`` (used only by statistics that declare ``concurrent``) and the
merge pass spread over the same pool, as the executor's chunk workers do. torch runs one thread
per op throughout (the executor's workers do too). Best of ``--repeats``; the CPUs are shared.

    python bench/micro_methods.py --rows 2048 --cols 2048 --chunk-rows 256
    PYTHONPATH=/path/to/other/checkout python bench/micro_methods.py   # compare a revision
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from mergekitlite import working_space
from mergekitlite.methods import REGISTRY, ChunkInfo, MethodSpec
from mergekitlite.methods.apply import compute_stats, row_chunks

DEFAULT_METHODS = (
    "task_arithmetic,ties,dare_ties,dare_linear,breadcrumbs,breadcrumbs_ties,della,della_linear,sce,"
    "slerp,nuslerp,multislerp,karcher,model_stock"
)
# Parameters that make each method do its usual work (recipe names); per-model ones are repeated.
PARAMS = {"weight": 0.5, "density": 0.5, "gamma": 0.01, "epsilon": 0.1, "t": 0.3, "select_topk": 0.5}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls, and the last call's value."""
    best, value = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return best, value


def run_method(
    spec: MethodSpec,
    base: Tensor,
    models: list[Tensor],
    chunk_rows: int,
    pool: Executor | None,
    window: int,
    repeats: int,
) -> tuple[float, float, Tensor]:
    """(statistic seconds, merge seconds, merged tensor) for one method."""
    n_models = spec.max_models if spec.max_models is not None and spec.max_models < len(models) else len(models)
    ms = models[:n_models]
    b = base if spec.base != "unused" else None
    params = working_space.params(spec, n_models, PARAMS)
    shape = tuple(base.shape)
    chunks = list(row_chunks(shape, chunk_rows, seed=1234))

    def load(c: ChunkInfo) -> tuple[Tensor | None, list[Tensor]]:
        return (b[c.row_start : c.row_end] if b is not None else None), [m[c.row_start : c.row_end] for m in ms]

    def stats() -> Any:
        return compute_stats(spec, shape, params, n_models, chunks, load, pool, window)

    stat_s, value = timed(stats, repeats)

    def merge_one(c: ChunkInfo) -> Tensor:
        cb, cm = load(c)
        return spec(cb, cm, params, chunk=c, stats=value)

    def merge() -> Tensor:
        parts = list(pool.map(merge_one, chunks)) if pool is not None else [merge_one(c) for c in chunks]
        return torch.cat(parts)

    merge_s, out = timed(merge, repeats)
    return stat_s, merge_s, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--chunk-rows", type=int, default=256)
    ap.add_argument("--models", type=int, default=2, help="fine-tunes besides the base")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--workers", type=int, default=2, help="threads of the pooled run (0: skip it)")
    ap.add_argument("--window", type=int, default=4, help="chunks in flight per statistic pass")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(args.rows, args.cols, generator=gen).mul_(0.02).bfloat16().float()
    models = [
        (base + torch.randn(args.rows, args.cols, generator=gen).mul_(0.002)).bfloat16().float()
        for _ in range(args.models)
    ]
    print(
        f"{args.rows}x{args.cols} float32, {args.models} models + base, {args.chunk_rows}-row chunks, "
        f"best of {args.repeats}; seconds"
    )
    header = f"{'method':<18}{'stats 1t':>10}{'merge 1t':>10}{'total 1t':>10}"
    if args.workers:
        header += f"{f'stats {args.workers}t':>10}{f'merge {args.workers}t':>10}{f'total {args.workers}t':>10}"
    print(header)
    pool = ThreadPoolExecutor(args.workers) if args.workers else None
    try:
        for name in args.methods.split(","):
            spec = REGISTRY.get(name)
            s1, m1, out1 = run_method(spec, base, models, args.chunk_rows, None, args.window, args.repeats)
            line = f"{name:<18}{s1:>10.3f}{m1:>10.3f}{s1 + m1:>10.3f}"
            if pool is not None:
                s2, m2, out2 = run_method(spec, base, models, args.chunk_rows, pool, args.window, args.repeats)
                same = torch.equal(out1.view(torch.int32), out2.view(torch.int32))
                line += f"{s2:>10.3f}{m2:>10.3f}{s2 + m2:>10.3f}" + ("" if same else "  DIFFERENT BITS")
            print(line, flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
