"""Each method's declared working space (``MethodSpec.temporaries``) covers what it really allocates.

The planner sizes chunks from that declaration (``--max-vram``); mergekitlite.working_space measures the
chunk-sized float32 arrays a method's statistic pass and merge really hold (heap bytes per torch
operation, at two chunk sizes): it must not exceed the declaration, for 1, 2, 3 and 5 models.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mergekitlite import working_space
from mergekitlite.methods import get_method

pytestmark = pytest.mark.skipif(not working_space.available(), reason="needs glibc's mallinfo2 to count heap bytes")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """As the executor's workers run: single-threaded ops (no per-thread scratch in the count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _warm_up() -> None:
    torch.set_num_threads(1)
    working_space.warm_up()


@pytest.mark.parametrize(("method", "n"), working_space.cases())
def test_declared_working_space_covers_the_method(method: str, n: int) -> None:
    spec = get_method(method)
    declared = spec.temporaries(n)
    for what, arrays in zip(("statistic pass", "merge"), working_space.arrays(spec, n), strict=True):
        assert arrays <= declared + 0.05, (
            f"{method} with {n} model(s): its {what} holds {arrays:.2f} chunk-sized float32 arrays besides the "
            f"inputs, but declares {declared} (MethodSpec.temporaries); the planner would overrun --max-vram"
        )
