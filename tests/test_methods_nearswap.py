"""NearSwap against hand-worked results."""

from __future__ import annotations

import torch

from mergekitlite.methods import get_method
from mergekitlite.methods.apply import merge_in_chunks


def nearswap(base: torch.Tensor, model: torch.Tensor, t: float, rows: int | None = None) -> torch.Tensor:
    return merge_in_chunks(get_method("nearswap"), base, [model], {"t": t}, rows_per_chunk=rows)


def test_nearswap() -> None:
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    model = torch.tensor([0.05, -0.2, 1.0, 1.0])
    # t = 0.1: |diff| = 0.05, 0.2, 1, 0 (→ 1e-6) → w = min(1, t/|diff|) = 1, 0.5, 0.1, 1
    expected = torch.tensor([0.05, -0.2 * 0.5, 1.0 * 0.1, 1.0])
    got = nearswap(base, model, 0.1, rows=3)
    assert bool(((got - expected).abs() <= 1e-7).all()), got
    assert torch.equal(nearswap(base, model, 0.0), base)
    assert torch.equal(nearswap(base, model, 5.0), model)
