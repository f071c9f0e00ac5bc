"""Measure a merge method's working space: the chunk-sized float32 arrays it holds besides its inputs.

The planner sizes chunks from each method's declaration (``MethodSpec.temporaries``): for ``--max-vram``
on a GPU, the device holds each in-flight chunk's compute copies of the inputs plus the method's
temporaries. An H200 run once found the statistic methods 27–54% over budget because they allocated
more than declared; this measures the same thing on the CPU, where every float32 array a method makes
is a heap allocation. tests/test_working_set.py asserts measured ≤ declared; bench/working_set.py prints
the table.

glibc's ``mallinfo2`` gives the bytes in use; a ``TorchDispatchMode`` samples it after every torch
operation of one chunk's merge (and of one statistic pass over it), ending with the cast to bf16 that a
GPU makes on the device before copying the result back. The peak at two chunk sizes gives the working
space *per element* (per-tensor state such as histograms cancels out), in float32 arrays of the chunk's
size. Run with one torch thread, as the executor's workers do (no per-thread scratch in the count).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mergekitlite.methods import REGISTRY, ChunkInfo, MethodSpec, get_method
from mergekitlite.methods.apply import compute_stats

COLS = 4096
ROWS = (64, 192)  # two chunk sizes: 1 MB and 3 MB per float32 array
MODEL_COUNTS = (1, 2, 3, 5)
# Realistic values for parameters without a usable default (the rest keep their defaults).
PARAMS = {"weight": 0.6, "density": 0.5, "epsilon": 0.1, "t": 0.3, "select_topk": 0.5}


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _libc_mallinfo2() -> Any:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallinfo2 if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _libc_mallinfo2()


def available() -> bool:
    """Whether heap bytes can be counted here (glibc's mallinfo2)."""
    return _MALLINFO2 is not None


def _heap_in_use() -> int:
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


class _PeakHeap(TorchDispatchMode):
    """Peak heap bytes in use, over the torch operations run inside the mode, above the start."""

    def __enter__(self) -> _PeakHeap:
        gc.collect()
        self.start = _heap_in_use()
        self.peak = 0
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use() - self.start)
        return out


def params(spec: MethodSpec, n: int, values: dict[str, Any] = PARAMS) -> dict[str, Any]:
    """``spec``'s parameters for ``n`` models as the method receives them: ``values`` where given (per-model
    ones repeated), defaults elsewhere."""
    out: dict[str, Any] = {}
    for p in spec.params:
        if p.required and p.name not in values:
            raise ValueError(f"{spec.name}: no value given for its required parameter {p.name!r}")
        value = values.get(p.name, p.default)
        out[p.name] = tuple([value] * n) if p.per_model else value
    return out


def _inputs(rows: int, n: int, with_base: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(rows * 10 + n)
    base = torch.randn(rows, COLS, generator=g)
    models = [base + 0.01 * torch.randn(rows, COLS, generator=g) for _ in range(n)]
    return (base if with_base else None), models


def peak_bytes(spec: MethodSpec, n: int, rows: int) -> tuple[int, int]:
    """Peak heap bytes of one chunk's statistic passes and of its merge (+ the bf16 cast)."""
    base, models = _inputs(rows, n, spec.base != "unused")
    kwargs = params(spec, n)
    shape = (rows, COLS)
    info = ChunkInfo(0, rows, shape, seed=7)
    stats, stats_peak = None, 0
    if spec.statistic is not None:
        with _PeakHeap() as mode:
            stats = compute_stats(spec, shape, kwargs, n, [info], lambda _i: (base, models), None, 1)
        stats_peak = mode.peak
    with _PeakHeap() as mode:
        result = spec(base, models, kwargs, chunk=info, stats=stats)
        result.to(torch.bfloat16)
        del result
    return stats_peak, mode.peak


def warm_up() -> None:
    """The first torch operations of a process allocate lasting state (seen: −10 arrays for the first
    method measured); measure something once before the real measurements."""
    peak_bytes(get_method("ties"), 2, ROWS[0])


def cases() -> list[tuple[str, int]]:
    """(method, number of models) for every method and every count in MODEL_COUNTS it accepts."""
    out = []
    for name, spec in sorted(REGISTRY.methods.items()):
        for n in MODEL_COUNTS:
            if n >= spec.min_models and (spec.max_models is None or n <= spec.max_models):
                out.append((name, n))
    return out


def arrays(spec: MethodSpec, n: int) -> tuple[float, float]:
    """Working space per element of the chunk, in chunk-sized float32 arrays: (statistic pass, merge)."""
    small, large = (peak_bytes(spec, n, rows) for rows in ROWS)
    array_bytes = (ROWS[1] - ROWS[0]) * COLS * 4  # one float32 array's growth between the two sizes
    stats, merge = ((hi - lo) / array_bytes for lo, hi in zip(small, large, strict=True))
    return stats, merge
