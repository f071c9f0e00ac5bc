"""NearSwap: take the other model's value where it lies close to the base's."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergekitlite.methods.registry import Implementation


def nearswap(base: Tensor, models: Sequence[Tensor], *, t: float) -> Tensor:
    """w·model + (1 − w)·base, w = clamp(t / max(|base − model|, 1e-6), 0, 1) per element.

    Elements that differ by at most ``t`` take the model's value; farther ones move toward it by
    t/|difference|. t ≤ 0 returns the base.
    """
    other = models[0]
    distance = (base - other).abs_().clamp_(min=1e-6)
    # One IEEE division (a Python scalar over a tensor would be reciprocal-then-multiply: two roundings).
    w = torch.full_like(distance, t).div_(distance).clamp_(0.0, 1.0)
    res = other * w
    return res.add_(base * (1 - w))


IMPLEMENTATIONS = {"nearswap": Implementation(nearswap)}
