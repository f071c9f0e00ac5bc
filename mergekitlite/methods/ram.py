"""RAM: Reinforced Agent Merging (mergekit's ``ram`` and its tensor-local variant ``ramplus_tl``).

With δᵢ = mᵢ − base, an element of δᵢ is *non-zero* where |δᵢ| > ``epsilon``, compared in the compute
dtype (``epsilon`` rounded to it, as torch rounds a Python scalar; |δ| equal to ε is not non-zero, and a
NaN δ never is). Per element, ``count`` = the number of models non-zero there. A model's entry is kept
whole where it is the only non-zero one (*unique*) and averaged with the others where several overlap
(δᵢ / count); entries that are not non-zero contribute nothing. ``ramplus_tl`` further scales each
model's unique entries by λᵢ = 1 + r·clamp(ρᵢ, 0, alpha), where ρᵢ = shared_i / max(unique_i, ε) compares,
over the whole tensor, how many of model i's non-zero entries overlap another model's with how many are
its own: a model whose changes are mostly shared gets its few unique ones reinforced.

Order of operations, in the compute dtype (float32 by default), which fixes every bit:

* tᵢ = δᵢ / count where δᵢ is non-zero (one correctly rounded division by the integer count: where the
  entry is unique, count is 1 and tᵢ = δᵢ exactly); for ``ramplus_tl`` unique entries are then multiplied
  by λᵢ rounded to the compute dtype (so tᵢ = δᵢ·λᵢ, one rounding); tᵢ = +0.0 elsewhere;
* the result is ((t₀ + t₁) + t₂ …) + base: the models' terms summed left to right, then the base added;
* λᵢ is computed in float64 from the exact integer counts (Python arithmetic), then rounded once.

The counts of ``ramplus_tl`` are integers summed over row chunks, so they do not depend on how the tensor
is cut or in which order (or on how many threads) its chunks are counted.

Where we differ from mergekit (0.1.5): it computes in the input dtype (bf16 for most checkpoints),
including δ, the division and the sum; we compute in float32 and cast once at the end. mergekit multiplies
by its masks, so a NaN δ (never non-zero) makes its output NaN; here such an entry contributes nothing.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mergekitlite.methods.primitives import (
    ABS_BITS,
    INF_BITS,
    ONE_BITS,
    StatisticFactory,
    above,
    apply_keep_,
    float32_bits,
)
from mergekitlite.methods.registry import ChunkInfo, Implementation


def _threshold(epsilon: float) -> int | None:
    """The int32 key t with (|δ| > ε ⟺ t < bits(|δ|)) for non-NaN float32 δ; ``None`` when no δ passes
    (ε is NaN). A negative ε lets every δ pass (−1 is below every key), and ε = −0.0 compares as +0.0."""
    e = float(torch.tensor(epsilon, dtype=torch.float32))
    if math.isnan(e):
        return None
    if e < 0:
        return -1
    return float32_bits(e) if e > 0 else 0


def nonzero_mask(delta: Tensor, epsilon: float) -> Tensor:
    """Mask (int32 all ones / zeros) of |δ| > ε. Overwrites a float32 ``delta`` (its bits become the keys)."""
    if delta.dtype != torch.float32:
        return (delta.abs() > epsilon).to(torch.int32).neg_()
    threshold = _threshold(epsilon)
    if threshold is None:
        return torch.zeros(delta.shape, dtype=torch.int32, device=delta.device)
    keys = delta.view(torch.int32).bitwise_and_(ABS_BITS)
    mask = above(keys, threshold)
    # NaN keys lie above every threshold, but |NaN| > ε is false: drop them (a subset of mask). Their mask,
    # (INF − key) < 0, is made in the keys' own storage rather than in a new array.
    return mask.bitwise_xor_(keys.neg_().add_(INF_BITS).bitwise_right_shift_(31))


def nonzero_count(base: Tensor, models: Sequence[Tensor], epsilon: float) -> Tensor:
    """Per element, how many models are non-zero there (int32). Each model's mask is made and dropped in
    turn (and made again where it is needed later), so the working space does not grow with the models."""
    count = nonzero_mask(models[0] - base, epsilon).neg_()
    for m in models[1:]:
        count.sub_(nonzero_mask(m - base, epsilon))  # masks are −1 where set
    return count


def unique_mask(count: Tensor) -> Tensor:
    """Mask (int32) of count == 1: (count − 1) is zero there, and for count in [0, n] ((count − 1) & 0x7fffffff) − 1
    is negative only there (count = 0 gives 2³¹ − 2)."""
    return (count - 1).bitwise_and_(ABS_BITS).sub_(1).bitwise_right_shift_(31)


def unique_factor(divisor: Tensor, value: float) -> Tensor:
    """``value`` (rounded to the divisor's dtype) where the divisor, a count, is 1 (a unique entry), 1.0 elsewhere.
    Made afresh from the divisor for each model rather than kept as a mask: one array less in the working space."""
    if divisor.dtype == torch.float32:
        is_one = (divisor.view(torch.int32) - ONE_BITS).bitwise_and_(ABS_BITS).sub_(1).bitwise_right_shift_(31)
        return is_one.bitwise_and_(float32_bits(value) ^ ONE_BITS).bitwise_xor_(ONE_BITS).view(torch.float32)
    one = torch.ones((), dtype=divisor.dtype, device=divisor.device)
    return torch.where(divisor == 1, torch.tensor(value, dtype=divisor.dtype, device=divisor.device), one)


def ram_merge(base: Tensor, models: Sequence[Tensor], epsilon: float, scales: Sequence[float] | None = None) -> Tensor:
    """base + Σᵢ tᵢ in the order of the module docstring; ``scales`` are ``ramplus_tl``'s λᵢ (``None``: all 1)."""
    divisor = nonzero_count(base, models, epsilon).to(base.dtype)
    total: Tensor | None = None
    for i, m in enumerate(models):
        keep = nonzero_mask(m - base, epsilon)
        term = torch.sub(m, base).div_(divisor)  # count = 0 gives NaN/inf here, but only where keep drops it
        if scales is not None and scales[i] != 1.0:
            term.mul_(unique_factor(divisor, scales[i]))
        apply_keep_(term, keep)
        del keep
        if total is None:
            total = term
        else:
            total.add_(term)
        del term  # not held while the next model's mask is made
    assert total is not None
    return total.add_(base)


def ram(base: Tensor, models: Sequence[Tensor], *, epsilon: float) -> Tensor:
    """base + Σᵢ tᵢ, tᵢ = δᵢ / count where |δᵢ| > ε (count: how many models change the element), else 0.

    Elements no model changes keep the base's value. See the module docstring for the order of operations.
    """
    return ram_merge(base, models, epsilon)


# ---------------------------------------------------------------------------------------------
# ramplus_tl: per-model counts of shared and unique non-zero entries over the whole tensor


@dataclass
class RamCounts:
    shared: list[int]
    unique: list[int]
    lock: threading.Lock = field(default_factory=threading.Lock)


def reinforcement(shared: int, unique: int, *, r: float, alpha: float, epsilon: float) -> float:
    """λ = 1 + r·clamp(ρ, 0, alpha) with ρ = shared / max(unique, ε), in float64. A zero denominator
    (unique = 0 and ε ≤ 0) gives ρ = +inf (0 when shared is 0 too); λ is then unused anyway, since it
    only scales the model's unique entries and it has none."""
    denominator = max(float(unique), epsilon)
    rho = shared / denominator if denominator != 0 else (math.inf if shared else 0.0)
    return 1.0 + r * min(max(rho, 0.0), alpha)


class RamPlusStatistic:
    """For each model, how many of its non-zero entries are shared with another model and how many are
    unique, over the whole tensor; the result is the models' λᵢ. Integer counts, added under a lock."""

    passes = 1
    concurrent = True

    def begin(self, shape: tuple[int, ...], n_models: int, params: Mapping[str, Any]) -> RamCounts:
        return RamCounts(shared=[0] * n_models, unique=[0] * n_models)

    def update(
        self,
        state: RamCounts,
        pass_index: int,
        base: Tensor | None,
        models: list[Tensor],
        params: Mapping[str, Any],
        chunk: ChunkInfo,
    ) -> None:
        assert base is not None
        epsilon = params["epsilon"]
        unique = unique_mask(nonzero_count(base, models, epsilon))
        counts = []
        for m in models:
            keep = nonzero_mask(m - base, epsilon)
            nonzero = -int(keep.sum())  # sums of int32 −1s: exact integers
            own = -int(keep.bitwise_and_(unique).sum())
            counts.append((nonzero - own, own))
        with state.lock:
            for i, (shared, own) in enumerate(counts):
                state.shared[i] += shared
                state.unique[i] += own

    def finish_pass(self, state: RamCounts, pass_index: int) -> None:
        pass

    def result(self, state: RamCounts) -> RamCounts:
        return state


def ramplus_tl(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    r: float,
    alpha: float,
    epsilon: float,
    stats: RamCounts,
) -> Tensor:
    """``ram`` with model i's unique entries × λᵢ (``reinforcement``).

    shared_i / unique_i: how many of model i's non-zero entries overlap another model's / are its own, over
    the whole tensor (tensor-local). See the module docstring for the order of operations.
    """
    scales = [
        reinforcement(s, u, r=r, alpha=alpha, epsilon=epsilon) for s, u in zip(stats.shared, stats.unique, strict=True)
    ]
    return ram_merge(base, models, epsilon, scales)


IMPLEMENTATIONS = {
    "ram": Implementation(ram),
    "ramplus_tl": Implementation(ramplus_tl, statistic=StatisticFactory(RamPlusStatistic)),
}
