"""Model Stock: interpolate between the base and the average of the fine-tunes by their mutual angle."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mergekitlite.errors import MethodInputError
from mergekitlite.methods.linear_form import LinearForm
from mergekitlite.methods.primitives import GramStatistic, StatisticFactory, accumulate_, divide_, fiber_dot
from mergekitlite.methods.registry import Implementation

_DEGENERATE = "use other models, or another method for this tensor (e.g. a rule with method: linear)"


def stock_ratio(cos_theta: float, n: int) -> float:
    """t = N·cos θ / (1 + (N − 1)·cos θ), the weight of the fine-tunes' average (Model Stock, eq. 2)."""
    denominator = 1 + (n - 1) * cos_theta
    if denominator == 0:
        raise MethodInputError(
            f"model_stock: the fine-tunes' offsets from the base have mean cosine {cos_theta} = −1/(N−1), "
            f"so t = N·cos θ/(1 + (N − 1)·cos θ) divides by zero; {_DEGENERATE}"
        )
    return n * cos_theta / denominator


def mean_pairwise_cosine(gram: Sequence[Sequence[float]]) -> float:
    """Mean over pairs i < j of ⟨oᵢ, oⱼ⟩/max(‖oᵢ‖‖oⱼ‖, 1e-6), each clamped to [−1, 1] (as mergekit)."""
    n = len(gram)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            product = math.sqrt(max(gram[i][i], 0.0)) * math.sqrt(max(gram[j][j], 0.0))
            cosines.append(min(1.0, max(-1.0, gram[i][j] / max(product, 1e-6))))
    return math.fsum(cosines) / len(cosines)


def _offsets(base: Tensor | None, models: Sequence[Tensor], params: Mapping[str, Any]) -> list[Tensor]:
    assert base is not None
    return [m - base for m in models]


def _whole_tensor(shape: tuple[int, ...], params: Mapping[str, Any]) -> bool:
    # filter_wise on a matrix works row by row (fibers along the last dim) and needs no statistic.
    return not (params["filter_wise"] and len(shape) >= 2)


def _average(models: Sequence[Tensor]) -> Tensor:
    return divide_(accumulate_([models[0].clone(), *models[1:]]), len(models))


def model_stock(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    filter_wise: bool,
    stats: Sequence[Sequence[float]] | None = None,
) -> Tensor:
    """t·mean(models) + (1 − t)·base, t = N·cos θ/(1 + (N − 1)·cos θ).

    θ is the angle between the fine-tunes' offsets from the base (the mean over pairs when N > 2),
    measured over the whole tensor, or per row (fibers along the last dim) with ``filter_wise`` —
    1-D tensors then count as a single row, as in mergekit.
    """
    n = len(models)
    if _whole_tensor(tuple(base.shape), {"filter_wise": filter_wise}):
        if stats is None:
            raise TypeError("model_stock needs its statistic: run it through its MethodSpec")
        t: float | Tensor = stock_ratio(mean_pairwise_cosine(stats), n)
        keep = 1 - t
    else:
        t = _row_ratios(_offsets(base, models, {}), n).to(base.dtype)
        keep = 1 - t
    res = _average(models).mul_(t)
    return res.add_(base * keep)


def model_stock_form(
    base: int | None,
    models: Sequence[int],
    *,
    filter_wise: bool,
    stats: Sequence[Sequence[float]] | None = None,
) -> LinearForm | None:
    """model_stock with one ratio for the whole tensor as the linear form t·(Σ mᵢ)/N + (1 − t)·base over the input
    positions, in ``model_stock``'s order of operations; None when the ratio varies by row (``filter_wise`` on a
    matrix: no statistic), which the tensor function computes."""
    if stats is None or base is None:
        return None
    t = stock_ratio(mean_pairwise_cosine(stats), len(models))
    return LinearForm(
        tuple(models), (None,) * len(models), divisor=len(models), scale=t, anchor=base, anchor_weight=1 - t
    )


def _row_ratios(offsets: Sequence[Tensor], n: int) -> Tensor:
    """t per fiber along the last dim, shaped [..., 1], in float64 with only IEEE-exact operations
    (products, quotients, square roots), so that every chunking gives the same bits."""
    norms = [fiber_dot(o, o).sqrt_() for o in offsets]
    total = torch.zeros_like(norms[0])
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            cosine = fiber_dot(offsets[i], offsets[j]) / (norms[i] * norms[j]).clamp_(min=1e-6)
            total.add_(cosine.clamp_(-1.0, 1.0))
            pairs += 1
    cos_theta = divide_(total, pairs)
    denominator = 1 + (n - 1) * cos_theta
    if bool((denominator == 0).any()):
        raise MethodInputError(
            "model_stock (filter_wise): a row's offsets from the base have mean cosine −1/(N−1), so "
            f"t = N·cos θ/(1 + (N − 1)·cos θ) divides by zero; {_DEGENERATE}"
        )
    return n * cos_theta / denominator


IMPLEMENTATIONS = {
    "model_stock": Implementation(
        model_stock, statistic=StatisticFactory(GramStatistic, _offsets, _whole_tensor), stats_form=model_stock_form
    )
}
