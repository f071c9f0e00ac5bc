"""Each method's declared working space (``MethodSpec.temporaries``) covers what it really allocates.

The planner sizes chunks from that declaration: for ``--max-vram`` on a GPU, the device holds each
in-flight chunk's compute copies of the inputs plus the method's temporaries. An H200 run once
found the statistic methods 27–54% over budget because they allocated more than declared; this test
measures the same thing on the CPU, where every float32 array a method makes is a heap allocation.

glibc's ``mallinfo2`` gives the bytes in use; a ``TorchDispatchMode`` samples it after every torch
operation of one chunk's merge (and of one statistic pass over it), ending with the cast to bf16
that a GPU makes on the device before copying the result back. The peak at two chunk sizes gives
the working space *per element* (per-tensor state such as histograms cancels out), in float32
arrays of the chunk's size: it must not exceed the declaration, for 1, 2, 3 and 5 models.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mergekitlite.methods import REGISTRY, ChunkInfo, MethodSpec, get_method
from mergekitlite.methods.apply import compute_stats


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
pytestmark = pytest.mark.skipif(_MALLINFO2 is None, reason="needs glibc's mallinfo2 to count heap bytes")


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


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """As the executor's workers run: single-threaded ops (no per-thread scratch in the count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


COLS = 4096
ROWS = (64, 192)  # two chunk sizes: 1 MB and 3 MB per float32 array

# Realistic values for parameters without a usable default (the rest keep their defaults).
PARAMS = {"weight": 0.6, "density": 0.5, "epsilon": 0.1, "t": 0.3, "select_topk": 0.5}


def _params(spec: MethodSpec, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in spec.params:
        value = PARAMS.get(p.name, p.default)
        if p.required and p.name not in PARAMS:
            pytest.fail(f"{spec.name}: add a test value for required parameter {p.name!r}")
        out[p.name] = tuple([value] * n) if p.per_model else value
    return out


def _inputs(rows: int, n: int, with_base: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(rows * 10 + n)
    base = torch.randn(rows, COLS, generator=g)
    models = [base + 0.01 * torch.randn(rows, COLS, generator=g) for _ in range(n)]
    return (base if with_base else None), models


def _peak_arrays(spec: MethodSpec, n: int, rows: int) -> tuple[int, int]:
    """Peak heap bytes of one chunk's statistic passes and of its merge (+ the bf16 cast)."""
    base, models = _inputs(rows, n, spec.base != "unused")
    params = _params(spec, n)
    shape = (rows, COLS)
    info = ChunkInfo(0, rows, shape, seed=7)
    stats, stats_peak = None, 0
    if spec.statistic is not None:
        with _PeakHeap() as mode:
            stats = compute_stats(spec, shape, params, n, [info], lambda _i: (base, models), None, 1)
        stats_peak = mode.peak
    with _PeakHeap() as mode:
        result = spec(base, models, params, chunk=info, stats=stats)
        result.to(torch.bfloat16)
        del result
    return stats_peak, mode.peak


@pytest.fixture(scope="module", autouse=True)
def _warm_up() -> None:
    """The first torch operations of a process allocate lasting state (seen: −10 arrays for the first
    method measured); measure something once before the real measurements."""
    torch.set_num_threads(1)
    _peak_arrays(get_method("ties"), 2, ROWS[0])


def _cases() -> list[tuple[str, int]]:
    cases = []
    for name, spec in sorted(REGISTRY.methods.items()):
        for n in (1, 2, 3, 5):
            if n >= spec.min_models and (spec.max_models is None or n <= spec.max_models):
                cases.append((name, n))
    return cases


@pytest.mark.parametrize(("method", "n"), _cases())
def test_declared_working_space_covers_the_method(method: str, n: int) -> None:
    spec = get_method(method)
    small, large = (_peak_arrays(spec, n, rows) for rows in ROWS)
    array_bytes = (ROWS[1] - ROWS[0]) * COLS * 4  # one float32 array's growth between the two sizes
    declared = spec.temporaries(n)
    for what, lo, hi in (("statistic pass", small[0], large[0]), ("merge", small[1], large[1])):
        arrays = (hi - lo) / array_bytes
        assert arrays <= declared + 0.05, (
            f"{method} with {n} model(s): its {what} holds {arrays:.2f} chunk-sized float32 arrays besides the "
            f"inputs, but declares {declared} (MethodSpec.temporaries); the planner would overrun --max-vram"
        )
