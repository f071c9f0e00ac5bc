"""Keep freed chunk memory in the process's heap while a merge runs (glibc only).

Every chunk's temporaries (upcast copies, float64 partial sums, masks) are a few MB. glibc serves such
blocks from mmap or gives them back to the kernel when they are freed (its trim and mmap thresholds), so
the next chunk's identical temporaries are page-faulted and zero-filled again: measured on the 1.3b
family, slerp took 8.6 million minor page faults and 16 s of system time for 5.4 GB of input, 2.9× the
wall time it takes with the memory kept. Raising the two thresholds for the merge makes freed blocks stay
on the heap's free lists and be reused; the peak is unchanged (the chunk budget bounds what is alive at
once), and the memory goes back to the kernel when the merge ends (``malloc_trim``).

mallopt is process-wide; ``retained_heap`` restores glibc's initial values on exit, so a long-lived
process that calls ``run_merge`` (e.g. ``evolve`` trials run in-process) keeps its usual behaviour
between merges. Elsewhere (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP = 1 << 30  # free top-of-heap memory is kept up to this much (the chunk budget keeps far less alive)
_MMAP_MAX = 32 << 20  # glibc's largest mmap threshold on 64-bit: blocks up to this come from the heap
_GLIBC_DEFAULT = 128 * 1024  # glibc's initial value of both thresholds


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def retained_heap() -> Iterator[None]:
    """Within the block, freed blocks up to 32 MB stay in the heap for reuse (see the module docstring)."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _KEEP)
    try:
        yield
    finally:
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
        libc.malloc_trim(0)
