"""Drive a method over a whole tensor in row chunks, exactly as the executor does.

The executor streams chunks from disk; this in-memory twin takes whole tensors. Both follow the
same sequence — statistic passes over every chunk, then the merge pass — so tests can check that
any chunking gives the result of a single chunk, bit for bit.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from typing import Any

import torch
from torch import Tensor

from mergekitlite.methods.registry import ChunkInfo, MethodSpec, tensor_rows


def row_chunks(shape: Sequence[int], rows_per_chunk: int, seed: int) -> Iterator[ChunkInfo]:
    rows = tensor_rows(shape)
    step = max(1, rows_per_chunk)
    for start in range(0, rows, step):
        yield ChunkInfo(start, min(rows, start + step), tuple(shape), seed)


def compute_stats(
    spec: MethodSpec,
    shape: Sequence[int],
    params: Mapping[str, Any],
    n_models: int,
    chunks: Sequence[ChunkInfo],
    load: Any,  # Callable[[ChunkInfo], tuple[Tensor | None, list[Tensor]]]
    pool: Executor | None = None,
    window: int = 4,
    shuffle_seed: int | None = None,
    native: bool = True,
) -> Any:
    """Run the method's statistic passes; ``load(chunk)`` returns (base, models) for the chunk.

    With a ``pool`` and a statistic that declares ``concurrent = True``, each pass's chunks are
    loaded and folded in by the pool's workers, at most ``window`` at a time, in any order.
    ``stat.passes`` is read again after every pass: ``finish_pass`` may drop passes it finds unneeded.
    ``shuffle_seed`` visits each pass's chunks in a shuffled order (for tests: order must not matter).
    ``native`` False keeps a statistic that has native kernels (a ``native`` attribute) on torch alone."""
    if spec.statistic is None:
        return None
    stat = spec.statistic()
    if hasattr(stat, "native"):
        stat.native = native
    state = stat.begin(tuple(shape), n_models, params)

    def fold(p: int, c: ChunkInfo) -> None:
        base, models = load(c)
        stat.update(state, p, base, models, params, c)

    p = 0
    while p < stat.passes:
        order = list(chunks)
        if shuffle_seed is not None:
            random.Random(shuffle_seed * 1_000_003 + p).shuffle(order)
        if pool is not None and getattr(stat, "concurrent", False):
            inflight: deque[Future[None]] = deque()
            for c in order:
                if len(inflight) >= window:
                    inflight.popleft().result()
                inflight.append(pool.submit(fold, p, c))
            while inflight:
                inflight.popleft().result()
        else:
            for c in order:
                fold(p, c)
        stat.finish_pass(state, p)
        p += 1
    return stat.result(state)


def merge_in_chunks(
    spec: MethodSpec,
    base: Tensor | None,
    models: Sequence[Tensor],
    params: Mapping[str, Any],
    *,
    rows_per_chunk: int | None = None,
    seed: int = 0,
    pool: Executor | None = None,
    window: int = 4,
    shuffle_seed: int | None = None,
) -> Tensor:
    """Merge whole in-memory tensors the way the executor would, with the given chunking.

    With a ``pool``, the statistic passes (of a concurrent statistic) and the merge pass run on its
    workers, as in the executor; ``shuffle_seed`` shuffles the order of each statistic pass's chunks."""
    ref = base if base is not None else models[0]
    shape = tuple(ref.shape)
    chunks = list(row_chunks(shape, rows_per_chunk or tensor_rows(shape), seed))

    def load(c: ChunkInfo) -> tuple[Tensor | None, list[Tensor]]:
        if not shape:
            return base, list(models)
        b = base[c.row_start : c.row_end] if base is not None else None
        return b, [m[c.row_start : c.row_end] for m in models]

    stats = compute_stats(spec, shape, params, len(models), chunks, load, pool, window, shuffle_seed)

    def merge(c: ChunkInfo) -> Tensor:
        b, ms = load(c)
        return spec(b, ms, params, chunk=c, stats=stats)

    parts = list(pool.map(merge, chunks)) if pool is not None else [merge(c) for c in chunks]
    return parts[0] if not shape else torch.cat(parts, dim=0)
