"""heap.retained_heap: chunk temporaries freed inside it are reused without new page faults, and glibc's
behaviour is back after it (measured with the process's minor page-fault counter)."""

from __future__ import annotations

import resource

import pytest
import torch

from mergekitlite.heap import _libc, retained_heap

pytestmark = pytest.mark.skipif(_libc() is None, reason="glibc's mallopt is only on Linux/glibc")


def _faults(rounds: int = 20) -> int:
    """Minor page faults of ``rounds`` chunk-like cycles: four 4 MB temporaries made, written and freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        temporaries = [torch.ones(1 << 20) for _ in range(4)]
        del temporaries
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_chunk_memory_is_reused_inside_and_returned_after() -> None:
    _faults(2)
    plain = _faults()
    with retained_heap():
        _faults(2)  # the first cycles fault the memory in once
        retained = _faults()
    after = _faults()
    # 20 cycles touch 80 MB = 20,480 pages; kept memory is touched without faulting again.
    assert retained < 100, (plain, retained)
    # Outside, glibc trims the freed top of the heap again, so new temporaries fault again.
    assert plain > 10 * max(retained, 1) and after > 10 * max(retained, 1), (plain, retained, after)
