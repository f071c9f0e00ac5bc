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
    # 20 cycles touch 80 MB = 20,480 pages; kept memory is touched without faulting again (a long-lived test
    # process may still fault in one 4 MB block: 1,024 pages seen in the full suite, 0 alone).
    assert retained < 2048, (plain, retained)
    # Outside, glibc trims the freed top of the heap again, so new temporaries fault again.
    assert plain > max(2 * retained, 1000) and after > max(2 * retained, 1000), (plain, retained, after)
