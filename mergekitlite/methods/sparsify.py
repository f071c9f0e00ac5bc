"""Sparsified task arithmetic: TIES, DARE, Model Breadcrumbs, DELLA (mergekit's "generalized task
arithmetic" family) and SCE.

Every method of the family computes, per tensor, with δᵢ = mᵢ − base:

1. sparsify each δᵢ with its ``density`` dᵢ (a mask), optionally rescaled so that its L1 norm is
   unchanged (``rescale``: δᵢ·mask·‖δᵢ‖₁/‖δᵢ·mask‖₁, skipped when either norm is < 1e-7, as mergekit);
   dᵢ ≥ 1 leaves δᵢ untouched and unrescaled;
2. weight it: wᵢ·δᵢ;
3. mix: either Σ wᵢδᵢ (divided by Σ wᵢ when ``normalize``, unless |Σ wᵢ| < 1e-8), or — for the TIES
   variants — elect a sign per element (sign of Σ wᵢδᵢ, + on 0) and sum only the entries that agree,
   dividing by the sum of the agreeing weights when ``normalize`` (by 1 where none agree);
4. base + λ·mix.

The masks need whole-tensor quantities (a top-k threshold, an L1 norm, ranks of a 1-D tensor), so every
method has a statistic. Masks are a pure function of the statistic, the chunk's values and their flat
indices; random masks draw from ``chunk.seed`` (one stream per model index), never from torch's RNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from mergekitlite.methods.primitives import (
    RowPartials,
    TopK,
    chunk_bernoulli,
    chunk_rows,
    chunk_uniform,
    divide_,
    float_key,
    magnitude_key,
    row_sums,
    sign_agreement,
    stream_key,
)
from mergekitlite.methods.registry import REQUIRED, ChunkInfo, merge_method

_RESCALE_EPS = 1e-7  # mergekit's threshold below which an L1 norm is treated as zero


# ---------------------------------------------------------------------------------------------
# Sparsifiers: one per model whose density is < 1


class Sparsifier(Protocol):
    """The mask of one model's task vector. ``phases`` are the statistic passes it needs before the
    final one; in the final pass ``keep(..., record=True)`` runs over the rows in order."""

    phases: tuple[str, ...]
    needs_final: bool

    def observe(self, phase: str, delta: Tensor, chunk: ChunkInfo) -> None: ...

    def settle(self, phase: str) -> None: ...

    def keep(self, delta: Tensor, chunk: ChunkInfo, *, record: bool = False) -> Tensor: ...


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _rows(shape: Sequence[int]) -> int:
    return shape[0] if shape else 1


@dataclass
class RankWindowSparsifier:
    """Keep the elements whose rank by |δ| (largest first; equal magnitudes: lower flat index first)
    lies in [lo, hi): ``magnitude`` (TIES) keeps [0, k), ``magnitude_outliers`` (Breadcrumbs) drops
    the largest and the smallest."""

    selector: TopK
    phases: tuple[str, ...] = ("high", "low")
    needs_final: bool = True

    @classmethod
    def window(cls, shape: Sequence[int], lo: int, hi: int) -> RankWindowSparsifier:
        return cls(TopK(_numel(shape), _rows(shape), [hi, lo] if lo > 0 else [hi]))

    def observe(self, phase: str, delta: Tensor, chunk: ChunkInfo) -> None:
        keys = magnitude_key(delta)
        (self.selector.count_high if phase == "high" else self.selector.count_low)(keys)

    def settle(self, phase: str) -> None:
        (self.selector.settle_high if phase == "high" else self.selector.settle_low)()

    def keep(self, delta: Tensor, chunk: ChunkInfo, *, record: bool = False) -> Tensor:
        tops = self.selector.keep(magnitude_key(delta), chunk.row_start, chunk_rows(chunk), record=record)
        return tops[0] & ~tops[1] if len(tops) == 2 else tops[0]


def magnitude_window(n: int, density: float) -> tuple[int, int]:
    """TIES: the ⌊density·n⌋ largest magnitudes (mergekit: ``int(density * numel)``)."""
    return 0, int(density * n)


def outlier_window(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs: drop the ⌊gamma·n⌋ largest magnitudes and enough of the smallest to keep
    ⌊density·n⌋; when density + gamma > 1, fewer of the largest are dropped (mergekit's arithmetic)."""
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bottom = n - keep - n_top
    if n_bottom < 0:
        n_top += n_bottom
        n_bottom = 0
    return n_top, n - n_bottom


@dataclass
class RandomSparsifier:
    """DARE: keep each element independently with probability ``density``: u < density, with u the
    element's uniform from stream ``stream`` (the model's index) of the tensor's seed."""

    stream: int
    density: float
    phases: tuple[str, ...] = ()
    needs_final: bool = False

    def observe(self, phase: str, delta: Tensor, chunk: ChunkInfo) -> None:
        pass

    def settle(self, phase: str) -> None:
        pass

    def keep(self, delta: Tensor, chunk: ChunkInfo, *, record: bool = False) -> Tensor:
        return chunk_bernoulli(stream_key(chunk.seed, self.stream), delta, chunk, self.density)


@dataclass
class DellaSparsifier:
    """DELLA (MAGPRUNE): keep each element with probability (d − ε) + 2ε·r/(n − 1), where r is its rank
    by |δ| (0 = smallest; equal magnitudes: lower index first) among the n elements of its fiber along
    dim 1 — the whole vector for 1-D tensors, whose ranks therefore take a statistic pass. A fiber of
    one element gets probability d."""

    stream: int
    density: float
    epsilon: float
    whole: bool  # rank over the whole (1-D or scalar) tensor
    rows: int = 0
    magnitudes: Tensor | None = None
    ranks: Tensor | None = None
    phases: tuple[str, ...] = ()
    needs_final: bool = False

    def __post_init__(self) -> None:
        if self.whole:
            self.phases = ("rank",)
            self.magnitudes = torch.zeros(self.rows, dtype=torch.float64)

    def observe(self, phase: str, delta: Tensor, chunk: ChunkInfo) -> None:
        assert self.magnitudes is not None
        self.magnitudes[chunk.row_start : chunk.row_end] = delta.reshape(-1).abs().to("cpu", torch.float64)

    def settle(self, phase: str) -> None:
        assert self.magnitudes is not None
        self.ranks = _ranks(self.magnitudes, 0)
        self.magnitudes = None

    def keep(self, delta: Tensor, chunk: ChunkInfo, *, record: bool = False) -> Tensor:
        if self.whole:
            assert self.ranks is not None, "DELLA on a 1-D tensor needs its rank pass"
            ranks = self.ranks[chunk.row_start : chunk.row_end].to(delta.device).reshape(delta.shape)
            n = self.ranks.numel()
        else:
            ranks = _ranks(delta.abs(), 1)
            n = delta.shape[1]
        rel = divide_(ranks.to(torch.float64), n - 1) if n > 1 else torch.full_like(ranks, 0.5, dtype=torch.float64)
        probability = (self.density - self.epsilon) + rel * (2 * self.epsilon)
        return chunk_uniform(stream_key(chunk.seed, self.stream), delta, chunk) < probability


def _ranks(magnitudes: Tensor, dim: int) -> Tensor:
    """0-based ascending ranks along ``dim``; a stable sort makes equal values rank by index."""
    order = torch.argsort(magnitudes, dim=dim, stable=True)
    shape = [1] * magnitudes.dim()
    shape[dim] = magnitudes.shape[dim]
    positions = torch.arange(magnitudes.shape[dim], device=magnitudes.device).reshape(shape).expand_as(order)
    return torch.empty_like(order).scatter_(dim, order, positions)


# ---------------------------------------------------------------------------------------------
# The family's statistic


@dataclass(frozen=True)
class SparseStats:
    """Per model: its sparsifier (``None``: kept whole) and its L1 rescale factor (``None``: none)."""

    sparsifiers: tuple[Sparsifier | None, ...]
    scales: tuple[float | None, ...]


@dataclass
class _SparseState:
    sparsifiers: list[Sparsifier | None]
    phases: list[str]
    rescale: bool
    l1: RowPartials  # rows: 2i = ‖δᵢ‖₁ per row, 2i + 1 = ‖δᵢ·maskᵢ‖₁ per row
    active: list[int] = field(default_factory=list)


class SparseStatistic:
    """Statistic passes for the family: the sparsifiers' own phases, then (if any sparsifier needs it,
    or to rescale) a final pass in row order recording tie counts and the per-row L1 norms."""

    passes = 3  # the most any kind needs; ``begin`` lowers it for the tensor at hand

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def begin(self, shape: tuple[int, ...], n_models: int, params: Mapping[str, Any]) -> _SparseState:
        sparsifiers = [make_sparsifier(self.kind, shape, params, i) for i in range(n_models)]
        active = [i for i, s in enumerate(sparsifiers) if s is not None]
        phases: list[str] = []
        if active:
            first = sparsifiers[active[0]]
            assert first is not None
            phases = list(first.phases)
            if first.needs_final or params["rescale"]:
                phases.append("final")
        self.passes = len(phases)
        l1 = RowPartials(2 * n_models, _rows(shape))
        return _SparseState(sparsifiers, phases, bool(params["rescale"]), l1, active)

    def update(
        self,
        state: _SparseState,
        pass_index: int,
        base: Tensor | None,
        models: list[Tensor],
        params: Mapping[str, Any],
        chunk: ChunkInfo,
    ) -> None:
        if pass_index >= len(state.phases):
            return
        assert base is not None
        phase = state.phases[pass_index]
        rows = chunk_rows(chunk)
        for i in state.active:
            sparsifier = state.sparsifiers[i]
            assert sparsifier is not None
            delta = models[i] - base
            if phase != "final":
                sparsifier.observe(phase, delta, chunk)
                continue
            keep = sparsifier.keep(delta, chunk, record=True)
            if state.rescale:
                magnitude = delta.abs()
                state.l1.put(2 * i, chunk.row_start, row_sums(magnitude, rows))
                state.l1.put(2 * i + 1, chunk.row_start, row_sums(magnitude * keep, rows))

    def finish_pass(self, state: _SparseState, pass_index: int) -> None:
        if pass_index < len(state.phases) and state.phases[pass_index] != "final":
            for i in state.active:
                sparsifier = state.sparsifiers[i]
                assert sparsifier is not None
                sparsifier.settle(state.phases[pass_index])

    def result(self, state: _SparseState) -> SparseStats:
        scales: list[float | None] = [None] * len(state.sparsifiers)
        if state.rescale:
            for i in state.active:
                before, after = state.l1.total(2 * i), state.l1.total(2 * i + 1)
                if before >= _RESCALE_EPS and after >= _RESCALE_EPS:
                    scales[i] = before / after
        return SparseStats(tuple(state.sparsifiers), tuple(scales))


def make_sparsifier(kind: str, shape: Sequence[int], params: Mapping[str, Any], i: int) -> Sparsifier | None:
    """Model i's sparsifier for this tensor, or ``None`` when its density is ≥ 1 (δ kept whole)."""
    density = float(params["density"][i])
    if density >= 1:
        return None
    n = _numel(shape)
    if kind == "magnitude":
        return RankWindowSparsifier.window(shape, *magnitude_window(n, density))
    if kind == "magnitude_outliers":
        return RankWindowSparsifier.window(shape, *outlier_window(n, density, float(params["gamma"][i])))
    if kind == "random":
        return RandomSparsifier(i, density)
    if kind == "della":
        epsilon = float(params["epsilon"][i])
        if density <= 0:
            return RandomSparsifier(i, 0.0)
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise ValueError(
                f"della: epsilon must keep density ± epsilon inside (0, 1); got density {density}, epsilon {epsilon}"
            )
        return DellaSparsifier(i, density, epsilon, whole=len(shape) < 2, rows=_rows(shape))
    raise ValueError(f"unknown sparsification {kind!r}")


# ---------------------------------------------------------------------------------------------
# Mixing


def sparse_deltas(
    base: Tensor, models: Sequence[Tensor], weight: Sequence[float], stats: SparseStats | None, chunk: ChunkInfo | None
) -> list[Tensor]:
    """wᵢ·rescaleᵢ·maskᵢ·(mᵢ − base) per model, in that order of float operations (as mergekit)."""
    out = []
    for i, m in enumerate(models):
        delta = m - base
        if stats is not None and (sparsifier := stats.sparsifiers[i]) is not None:
            if chunk is None:
                raise TypeError("a sparsified method needs the chunk it is given (call it through its MethodSpec)")
            delta.masked_fill_(~sparsifier.keep(delta, chunk), 0.0)
            if (scale := stats.scales[i]) is not None:
                delta.mul_(scale)
        out.append(delta.mul_(weight[i]))
    return out


def mix(weighted: Sequence[Tensor], weight: Sequence[float], *, consensus: bool, normalize: bool) -> Tensor:
    """Σ of the weighted deltas: all of them, or (``consensus``) only those agreeing with the elected
    sign; divided, when ``normalize``, by Σ wᵢ (resp. by the agreeing wᵢ per element)."""
    if not consensus:
        total = weighted[0].clone()
        for d in weighted[1:]:
            total.add_(d)
        divisor = math.fsum(weight)
        if normalize and abs(divisor) >= 1e-8:
            divide_(total, divisor)
        return total
    agree = sign_agreement(weighted)
    total = torch.where(agree[0], weighted[0], 0.0)
    divisor = agree[0].to(total.dtype) * weight[0]
    for d, a, w in zip(weighted[1:], agree[1:], weight[1:], strict=True):
        total.add_(torch.where(a, d, 0.0))
        divisor.add_(a.to(total.dtype) * w)
    if normalize:
        total.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return total


def _merge(
    base: Tensor,
    models: Sequence[Tensor],
    weight: Sequence[float],
    stats: SparseStats | None,
    chunk: ChunkInfo | None,
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> Tensor:
    if stats is None:
        raise TypeError("this method needs its statistic: run it through its MethodSpec (executor, merge_in_chunks)")
    mixed = mix(sparse_deltas(base, models, weight, stats, chunk), weight, consensus=consensus, normalize=normalize)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)


# ---------------------------------------------------------------------------------------------
# The generalized task arithmetic methods (mergekit's names, parameters and defaults)


def _statistic(kind: str) -> Any:
    return lambda: SparseStatistic(kind)


@merge_method(
    "ties",
    base="required",
    per_model={"weight": REQUIRED, "density": 1.0},
    elementwise=False,
    statistic=_statistic("magnitude"),
    reference="https://arxiv.org/abs/2306.01708",
)
def ties(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    chunk: ChunkInfo | None = None,
    stats: SparseStats | None = None,
) -> Tensor:
    """TIES: keep each task vector's ⌊dᵢ·n⌋ largest |δ|, elect signs by mass, mean of the agreeing entries.

    base + λ·Σᵢ wᵢ·topₖ(δᵢ)·[agrees] / Σᵢ wᵢ·[agrees]. Ties at the k-th magnitude keep the lowest flat
    indices, so exactly k survive. ``int8_mask`` only saves memory in mergekit and is accepted for
    compatibility.
    """
    del density, int8_mask
    return _merge(base, models, weight, stats, chunk, consensus=True, normalize=normalize, lambda_=lambda_)


@merge_method(
    "dare_ties",
    base="required",
    per_model={"weight": REQUIRED, "density": 1.0},
    elementwise=False,
    statistic=_statistic("random"),
    random=True,
    reference="https://arxiv.org/abs/2311.03099",
)
def dare_ties(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    chunk: ChunkInfo | None = None,
    stats: SparseStats | None = None,
) -> Tensor:
    """DARE + TIES: drop each element of δᵢ with probability 1 − dᵢ, rescale to the same L1 norm, TIES mix.

    ``rescale`` multiplies the kept entries by ‖δᵢ‖₁/‖kept‖₁ (mergekit's definition: ≈ 1/dᵢ, not exactly).
    """
    del density, int8_mask
    return _merge(base, models, weight, stats, chunk, consensus=True, normalize=normalize, lambda_=lambda_)


@merge_method(
    "dare_linear",
    base="required",
    per_model={"weight": REQUIRED, "density": 1.0},
    elementwise=False,
    statistic=_statistic("random"),
    random=True,
    reference="https://arxiv.org/abs/2311.03099",
)
def dare_linear(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    chunk: ChunkInfo | None = None,
    stats: SparseStats | None = None,
) -> Tensor:
    """DARE: drop each element of δᵢ with probability 1 − dᵢ, rescale to the same L1 norm, then task arithmetic.

    base + λ·Σᵢ wᵢ·maskᵢ·δᵢ·‖δᵢ‖₁/‖maskᵢ·δᵢ‖₁ (÷ Σ wᵢ when ``normalize``).
    """
    del density, int8_mask
    return _merge(base, models, weight, stats, chunk, consensus=False, normalize=normalize, lambda_=lambda_)


@merge_method(
    "breadcrumbs",
    base="required",
    per_model={"weight": REQUIRED, "density": 1.0, "gamma": 0.01},
    elementwise=False,
    statistic=_statistic("magnitude_outliers"),
    reference="https://arxiv.org/abs/2312.06795",
)
def breadcrumbs(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    gamma: Sequence[float],
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    chunk: ChunkInfo | None = None,
    stats: SparseStats | None = None,
) -> Tensor:
    """Model Breadcrumbs: drop the ⌊γᵢ·n⌋ largest |δ| (outliers) and the smallest, keeping ⌊dᵢ·n⌋; task arithmetic.

    base + λ·Σᵢ wᵢ·maskᵢ·δᵢ (÷ Σ wᵢ when ``normalize``).
    """
    del density, gamma, int8_mask
    return _merge(base, models, weight, stats, chunk, consensus=False, normalize=normalize, lambda_=lambda_)


@merge_method(
    "breadcrumbs_ties",
    base="required",
    per_model={"weight": REQUIRED, "density": 1.0, "gamma": 0.01},
    elementwise=False,
    statistic=_statistic("magnitude_outliers"),
    reference="https://arxiv.org/abs/2312.06795",
)
def breadcrumbs_ties(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    gamma: Sequence[float],
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    chunk: ChunkInfo | None = None,
    stats: SparseStats | None = None,
) -> Tensor:
    """Model Breadcrumbs masks (drop the ⌊γᵢ·n⌋ largest and the smallest |δ|, keep ⌊dᵢ·n⌋) with TIES sign election."""
    del density, gamma, int8_mask
    return _merge(base, models, weight, stats, chunk, consensus=True, normalize=normalize, lambda_=lambda_)


@merge_method(
    "della",
    base="required",
    per_model={"weight": REQUIRED, "density": 1.0, "epsilon": 0.15},
    elementwise=False,
    statistic=_statistic("della"),
    random=True,
    reference="https://arxiv.org/abs/2406.11617",
)
def della(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    epsilon: Sequence[float],
    normalize: bool = True,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    chunk: ChunkInfo | None = None,
    stats: SparseStats | None = None,
) -> Tensor:
    """DELLA: keep δ entries with probability dᵢ − εᵢ … dᵢ + εᵢ rising with their magnitude rank, rescale, TIES mix.

    The rank runs along dim 1 (the whole vector for 1-D tensors); ``rescale`` restores ‖δᵢ‖₁.
    """
    del density, epsilon, int8_mask
    return _merge(base, models, weight, stats, chunk, consensus=True, normalize=normalize, lambda_=lambda_)


@merge_method(
    "della_linear",
    base="required",
    per_model={"weight": REQUIRED, "density": 1.0, "epsilon": 0.15},
    elementwise=False,
    statistic=_statistic("della"),
    random=True,
    reference="https://arxiv.org/abs/2406.11617",
)
def della_linear(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    epsilon: Sequence[float],
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    chunk: ChunkInfo | None = None,
    stats: SparseStats | None = None,
) -> Tensor:
    """DELLA's magnitude-ranked random drop (probability dᵢ ± εᵢ), L1 rescale, then task arithmetic."""
    del density, epsilon, int8_mask
    return _merge(base, models, weight, stats, chunk, consensus=False, normalize=normalize, lambda_=lambda_)


# ---------------------------------------------------------------------------------------------
# SCE: select by variance across models, weight by energy, erase minority signs


def variance_key(deltas: Sequence[Tensor]) -> Tensor:
    """Bit patterns (float32) of the population variance across models, per element, computed in float64."""
    wide = [d.to(torch.float64) for d in deltas]
    mean = wide[0].clone()
    for d in wide[1:]:
        mean.add_(d)
    divide_(mean, len(wide))
    var = torch.zeros_like(mean)
    for d in wide:
        centred = d - mean
        var.add_(centred * centred)
    return float_key(divide_(var, len(wide)))


@dataclass(frozen=True)
class SceStats:
    selector: TopK | None  # None: no selection (select_topk ≥ 1)
    weights: tuple[float, ...]


@dataclass
class _SceState:
    n: int
    rows: int
    select: float
    phases: list[str]
    selector: TopK | None
    energy: RowPartials  # per model, per row: Σ (masked δᵢ)²
    nonzero: int = 0


class SceStatistic:
    """Passes: (select_topk in (0, 1)) histogram of the variance's high bits and count of non-zero
    variances, then its low bits; finally, in row order, tie counts and each model's Σ δ² after selection."""

    passes = 3

    def begin(self, shape: tuple[int, ...], n_models: int, params: Mapping[str, Any]) -> _SceState:
        select = float(params["select_topk"])
        n, rows = _numel(shape), _rows(shape)
        if select >= 1:
            phases, selector = ["final"], None
        elif select <= 0:
            phases, selector = [], TopK(n, rows, [0])
        else:
            phases, selector = ["high", "low", "final"], TopK(n, rows, [])
        self.passes = len(phases)
        return _SceState(n, rows, select, phases, selector, RowPartials(n_models, rows))

    def update(
        self,
        state: _SceState,
        pass_index: int,
        base: Tensor | None,
        models: list[Tensor],
        params: Mapping[str, Any],
        chunk: ChunkInfo,
    ) -> None:
        if pass_index >= len(state.phases):
            return
        assert base is not None
        deltas = [m - base for m in models]
        phase = state.phases[pass_index]
        selector = state.selector
        keep: Tensor | None = None
        if selector is not None:
            keys = variance_key(deltas)
            if phase == "high":
                selector.count_high(keys)
                state.nonzero += int(torch.count_nonzero(keys))
                return
            if phase == "low":
                selector.count_low(keys)
                return
            keep = selector.keep(keys, chunk.row_start, chunk_rows(chunk), record=True)[0]
        for i, d in enumerate(deltas):
            square = d.to(torch.float64) * d.to(torch.float64)
            state.energy.put(i, chunk.row_start, row_sums(square if keep is None else square * keep, chunk_rows(chunk)))

    def finish_pass(self, state: _SceState, pass_index: int) -> None:
        phase = state.phases[pass_index] if pass_index < len(state.phases) else None
        if phase == "high":
            assert state.selector is not None
            state.selector.choose([int(state.nonzero * state.select)])
            state.selector.settle_high()
        elif phase == "low":
            assert state.selector is not None
            state.selector.settle_low()

    def result(self, state: _SceState) -> SceStats:
        count = state.energy.values.shape[0]
        means = [state.energy.total(i) / state.n for i in range(count)] if "final" in state.phases else [0.0] * count
        total = math.fsum(means)
        weights = [1.0 / count] * count if abs(total) < 1e-6 else [m / total for m in means]
        return SceStats(state.selector, tuple(weights))


@merge_method(
    "sce",
    base="required",
    elementwise=False,
    statistic=SceStatistic,
    reference="https://arxiv.org/abs/2408.07990",
)
def sce(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    select_topk: float = 1.0,
    int8_mask: bool = False,
    chunk: ChunkInfo | None = None,
    stats: SceStats | None = None,
) -> Tensor:
    """SCE: keep the ⌊select_topk·nnz⌋ elements whose task vectors vary most across models, weight each
    model by its share of Σ mean(δᵢ²), and average the entries agreeing with the elected sign.

    base + Σᵢ ωᵢ·[agrees]·δᵢ / max(Σᵢ ωᵢ·[agrees], 1e-6), with ωᵢ = mean(δᵢ²)/Σⱼ mean(δⱼ²) over the
    selected δ (uniform when that sum is < 1e-6); nnz counts the elements of non-zero variance.
    """
    del select_topk, int8_mask
    if stats is None or chunk is None:
        raise TypeError("sce needs its statistic and chunk: run it through its MethodSpec (executor, merge_in_chunks)")
    deltas = [m - base for m in models]
    if stats.selector is not None:
        keep = stats.selector.keep(variance_key(deltas), chunk.row_start, chunk_rows(chunk))[0]
        for d in deltas:
            d.masked_fill_(~keep, 0.0)
    agree = sign_agreement(deltas)
    total = torch.where(agree[0], deltas[0] * stats.weights[0], 0.0)
    divisor = agree[0].to(total.dtype) * stats.weights[0]
    for d, a, w in zip(deltas[1:], agree[1:], stats.weights[1:], strict=True):
        total.add_(torch.where(a, d * w, 0.0))
        divisor.add_(a.to(total.dtype) * w)
    return total.div_(divisor.clamp_(min=1e-6)).add_(base)
