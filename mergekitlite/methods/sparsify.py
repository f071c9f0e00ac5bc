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

The family is one table, ``catalog.GTA_FAMILY`` (as mergekit's registry): each member is a sparsifier
(``magnitude``: TIES, ``random``: DARE, ``magnitude_outliers``: Breadcrumbs, ``della``), with or without
sign election, and its defaults; ``generalized_task_arithmetic`` makes its function and statistic. Magnitude
top-k keeps exactly ⌊d·n⌋ entries (ties at the threshold keep the lowest flat indices). ``rescale`` uses
mergekit's definition, ‖δᵢ‖₁/‖kept‖₁ (≈ 1/dᵢ for DARE, not exactly). ``int8_mask`` only saves memory in
mergekit and is accepted for compatibility.

The masks need whole-tensor quantities (a top-k threshold, an L1 norm, ranks of a 1-D tensor), so every
method has a statistic. Masks are a pure function of the statistic, the chunk's values and their flat
indices; random masks draw from ``chunk.seed`` (one stream per model index), never from torch's RNG.
Masks are int32 bit masks (see ``primitives``); the statistics are concurrent.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from mergekitlite.errors import MethodInputError
from mergekitlite.methods import native_gta, native_stats
from mergekitlite.methods.catalog import GTA_FAMILY, GtaMethod, della_window_problem
from mergekitlite.methods.native_gta import KEEP_ALL, MASK_NONE, MASK_RANDOM, MASK_TOPK, NativeMask
from mergekitlite.methods.primitives import (
    NAN_KEY,
    RowPartials,
    StatisticFactory,
    TopK,
    accumulate_,
    agreeing_weight_sum,
    agreement_masks,
    apply_keep_,
    bernoulli_mask,
    chunk_rows,
    divide_,
    float_key,
    keep_factor,
    probability_bound,
    random_bits,
    row_sums,
    sign_agreement,
    stream_key,
)
from mergekitlite.methods.registry import ChunkInfo, Implementation, NativeMerge, tensor_rows

_RESCALE_EPS = 1e-7  # mergekit's threshold below which an L1 norm is treated as zero


# ---------------------------------------------------------------------------------------------
# Sparsifiers: one per model whose density is < 1

# Every statistic phase a sparsifier may need before its mask is known, in the order they run.
_PHASES = ("rank", "high", "low", "ties")


class Sparsifier(Protocol):
    """The mask of one model's task vector. ``phases``: the statistic passes it may need (a subset of
    ``_PHASES``); ``wants`` says, once the earlier phases are settled, whether a phase is still needed.
    ``observe`` may run concurrently for different chunks of a phase, in any order. ``keep_mask`` gives
    an int32 bit mask (``None``: keep all); it depends only on |δ| and positions, so it may be given
    either δ or |δ| (and ``magnitude`` = |δ| when already computed).

    Sparsifiers with a native kernel also have ``native_mask(chunk) -> NativeMask | None`` (the same mask,
    described for the kernel; ``None``: not for this chunk) and ``count_raw(phase, raw, codes, i, chunk)``:
    ``observe`` with model i's |δ| counted by the kernel from the raw inputs, returned as a function that
    records the counts (``None``: the kernel cannot count this chunk)."""

    phases: tuple[str, ...]

    def wants(self, phase: str) -> bool: ...

    def observe(self, phase: str, magnitude: Tensor, chunk: ChunkInfo) -> None: ...

    def settle(self, phase: str) -> None: ...

    def keep_mask(self, delta: Tensor, chunk: ChunkInfo, magnitude: Tensor | None = None) -> Tensor | None: ...


@dataclass
class RankWindowSparsifier:
    """Keep the elements whose rank by |δ| (largest first; equal magnitudes: lower flat index first)
    lies in [lo, hi): ``magnitude`` (TIES) keeps [0, k), ``magnitude_outliers`` (Breadcrumbs) drops
    the largest and the smallest."""

    selector: TopK
    phases: tuple[str, ...] = ("high", "low", "ties")

    @classmethod
    def window(cls, shape: Sequence[int], lo: int, hi: int) -> RankWindowSparsifier:
        return cls(TopK(math.prod(shape), tensor_rows(shape), [hi, lo] if lo > 0 else [hi]))

    def wants(self, phase: str) -> bool:
        return self.selector.wants(phase)

    def observe(self, phase: str, magnitude: Tensor, chunk: ChunkInfo) -> None:
        keys = float_key(magnitude)
        if phase == "high":
            self.selector.count_high(keys)
        elif phase == "low":
            self.selector.count_low(keys)
        else:
            self.selector.count_ties(keys, chunk.row_start, chunk_rows(chunk))

    def settle(self, phase: str) -> None:
        {"high": self.selector.settle_high, "low": self.selector.settle_low, "ties": self.selector.settle_ties}[phase]()

    def count_raw(
        self, phase: str, raw: Sequence[Any], codes: Sequence[str], i: int, chunk: ChunkInfo
    ) -> Callable[[], None] | None:
        selector = self.selector
        rows = chunk_rows(chunk)
        if phase == "high":
            if not selector.high_wanted():
                return lambda: None
            selector.recording = native_gta.RECORD_SLOTS  # the low pass is counted here too: record its ties
            hist = native_gta.count_high(raw, codes, i)
            return None if hist is None else lambda: selector.add_high(hist)
        if phase == "low":
            records = selector.low_records(chunk.row_start, rows)
            low = native_gta.count_low(raw, codes, i, selector.low_bins(), rows, records)
            if low is None:
                return None
            hists, overflow = low

            def commit() -> None:
                selector.add_low(hists)
                if records is not None:
                    selector.add_recorded(rows, overflow)

            return commit
        counts = native_gta.count_ties(raw, codes, i, rows, selector.tie_thresholds())
        return None if counts is None else lambda: selector.put_ties(chunk.row_start, counts)

    def native_mask(self, chunk: ChunkInfo) -> NativeMask | None:
        # keep_mask's composition (the first query's keys, minus the second's) is the kernel's.
        rules = self.selector.mask_rules(chunk.row_start, chunk_rows(chunk))
        return None if rules is None else NativeMask(MASK_TOPK, tuple(rules))

    def keep_mask(self, delta: Tensor, chunk: ChunkInfo, magnitude: Tensor | None = None) -> Tensor | None:
        keys = float_key(delta.abs() if magnitude is None else magnitude)
        tops = self.selector.masks(keys, chunk.row_start, chunk_rows(chunk))
        if len(tops) == 1 or tops[1] is None:
            return tops[0] if len(tops) == 1 else torch.zeros_like(keys)  # dropping all n largest drops all
        inside = tops[1].bitwise_not_()
        return inside if tops[0] is None else tops[0].bitwise_and_(inside)


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

    def wants(self, phase: str) -> bool:
        return False

    def observe(self, phase: str, magnitude: Tensor, chunk: ChunkInfo) -> None:
        pass

    def settle(self, phase: str) -> None:
        pass

    def count_raw(
        self, phase: str, raw: Sequence[Any], codes: Sequence[str], i: int, chunk: ChunkInfo
    ) -> Callable[[], None] | None:
        return lambda: None

    def native_mask(self, chunk: ChunkInfo) -> NativeMask | None:
        bound = probability_bound(self.density)  # as bernoulli_mask: bits < bound ⟺ hash < bound·2¹¹
        if bound == 0:
            return NativeMask(MASK_NONE)
        if bound >= 1 << 53:
            return KEEP_ALL
        return NativeMask(MASK_RANDOM, key=stream_key(chunk.seed, self.stream), limit=bound << 11)

    def keep_mask(self, delta: Tensor, chunk: ChunkInfo, magnitude: Tensor | None = None) -> Tensor | None:
        return bernoulli_mask(stream_key(chunk.seed, self.stream), delta, chunk, self.density)


@dataclass
class DellaSparsifier:
    """DELLA (MAGPRUNE): keep each element with probability (d − ε) + 2ε·r/(n − 1), where r is its rank
    by |δ| (0 = smallest; equal magnitudes: lower index first) among the n elements of its fiber along
    dim 1 — the whole vector for 1-D tensors, whose ranks therefore take a statistic pass. A fiber of
    one element gets probability d.

    The probabilities only depend on r, so each rank's integer bound ⌈p(r)·2⁵³⌉ is computed once per
    tensor (by the same float64 operations as p itself) and compared with the element's random bits."""

    stream: int
    density: float
    epsilon: float
    whole: bool  # rank over the whole (1-D or scalar) tensor
    native: bool = True  # in-row ranks by the native statistics kernel (the same values)
    rows: int = 0
    fiber: int = 1  # n: elements ranked together
    magnitudes: Tensor | None = None
    ranks: Tensor | None = None  # whole: each element's bound, from its rank in the tensor
    bounds: Tensor | None = None  # int64 [n]: u < p(r) ⟺ bits < bounds[r]
    phases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.whole:
            self.phases = ("rank",)
            self.magnitudes = torch.zeros(self.rows, dtype=torch.float64)
        n = self.fiber
        ranks = torch.arange(n, dtype=torch.float64)
        rel = divide_(ranks, n - 1) if n > 1 else torch.full_like(ranks, 0.5)
        probability = (self.density - self.epsilon) + rel * (2 * self.epsilon)
        self.bounds = probability.mul_(2.0**53).ceil_().clamp_(0.0, 2.0**53).to(torch.int64)

    def wants(self, phase: str) -> bool:
        return phase in self.phases

    def observe(self, phase: str, magnitude: Tensor, chunk: ChunkInfo) -> None:
        assert self.magnitudes is not None
        self.magnitudes[chunk.row_start : chunk.row_end] = magnitude.reshape(-1).to("cpu", torch.float64)

    def settle(self, phase: str) -> None:
        assert self.magnitudes is not None and self.bounds is not None
        self.ranks = self.bounds[_ranks(self.magnitudes, 0)]  # each element's bound, by its rank
        self.magnitudes = None

    def keep_mask(self, delta: Tensor, chunk: ChunkInfo, magnitude: Tensor | None = None) -> Tensor | None:
        assert self.bounds is not None
        if self.whole:
            assert self.ranks is not None, "DELLA on a 1-D tensor needs its rank pass"
            bound = self.ranks[chunk.row_start : chunk.row_end].to(delta.device).reshape(delta.shape)
        else:
            bound = by_fiber_rank(delta.abs() if magnitude is None else magnitude, self.bounds, self.native)
        bits = random_bits(stream_key(chunk.seed, self.stream), chunk.flat_start, delta.numel(), delta.device)
        return bits.lt_(bound.reshape(-1)).to(torch.int32).neg_().reshape(delta.shape)


def _ranks(magnitudes: Tensor, dim: int) -> Tensor:
    """0-based ascending ranks along ``dim``; a stable sort makes equal values rank by index."""
    order = torch.argsort(magnitudes, dim=dim, stable=True)
    shape = [1] * magnitudes.dim()
    shape[dim] = magnitudes.shape[dim]
    positions = torch.arange(magnitudes.shape[dim], device=magnitudes.device).reshape(shape).expand_as(order)
    return torch.empty_like(order).scatter_(dim, order, positions)


def by_fiber_rank(magnitude: Tensor, values: Tensor, native: bool = True) -> Tensor:
    """``values[r]`` (int64) for each element, r its rank by magnitude along dim 1 (as ``_ranks``).

    float32 magnitudes are ranked by sorting unique int64 keys (bit pattern·2³² + position): equal
    magnitudes then rank by position without a stable sort, numpy's vectorised integer sort is about ten
    times faster than torch's stable float argsort, and scattering ``values`` into the sorted positions
    needs no rank tensor. Every NaN gets one key above +inf, as torch's sort puts NaNs last, in order. A 2-D
    float32 CPU tensor goes through the native statistics kernel (``native``): a stable radix sort per row."""
    n = magnitude.shape[1]
    values = values.to(magnitude.device)
    if native and magnitude.dim() == 2 and native_stats.supports([magnitude]) and n < 1 << 31:
        return native_stats.fiber_rank_values(magnitude, values)  # the same ranks by a radix sort
    if magnitude.dtype != torch.float32 or n >= 1 << 31:
        return values[_ranks(magnitude, 1)]
    fibers = magnitude.movedim(1, -1)
    keys = fibers.contiguous().view(torch.int32).clamp(max=NAN_KEY).to(torch.int64)
    position = torch.arange(n, device=magnitude.device)
    composite = keys.bitwise_left_shift_(32).bitwise_or_(position).reshape(-1, n)
    if composite.device.type == "cpu":
        ordered = torch.from_numpy(np.sort(composite.numpy(), axis=1))  # numpy's sort releases the GIL
    else:
        ordered = torch.sort(composite, dim=1).values
    order = ordered.bitwise_and_(0xFFFFFFFF)  # the positions, smallest magnitude first
    out = torch.empty_like(order).scatter_(1, order, values.expand_as(order))
    return out.reshape(fibers.shape).movedim(-1, 1)


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

    def wanting(self, phase: str) -> list[tuple[int, Sparsifier]]:
        out = []
        for i in self.active:
            sparsifier = self.sparsifiers[i]
            assert sparsifier is not None
            if phase == "rescale" or sparsifier.wants(phase):
                out.append((i, sparsifier))
        return out


class SparseStatistic:
    """Statistic passes for the family: the sparsifiers' own phases (those still wanted once the
    earlier ones are settled: TopK's tie pass only when a threshold splits tied magnitudes), then, to
    rescale, a pass recording the per-row L1 norms before and after masking."""

    passes = 4  # the most any kind needs; ``begin`` and ``finish_pass`` set it for the tensor at hand
    concurrent = True
    native = True  # DELLA's in-row ranks by the native statistics kernel (the executor sets it from --no-native)

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def begin(self, shape: tuple[int, ...], n_models: int, params: Mapping[str, Any]) -> _SparseState:
        sparsifiers = [make_sparsifier(self.kind, shape, params, i, self.native) for i in range(n_models)]
        active = [i for i, s in enumerate(sparsifiers) if s is not None]
        l1 = RowPartials(2 * n_models, tensor_rows(shape))
        state = _SparseState(sparsifiers, [], bool(params["rescale"]), l1, active)
        state.phases = [p for p in _PHASES if state.wanting(p)] + (["rescale"] if active and state.rescale else [])
        self.passes = len(state.phases)
        return state

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
        for i, sparsifier in state.wanting(phase):
            magnitude = (models[i] - base).abs_()  # |δ|: computed once; the keys are its bit patterns
            if phase != "rescale":
                sparsifier.observe(phase, magnitude, chunk)
                continue
            keep = sparsifier.keep_mask(magnitude, chunk, magnitude)  # masks depend on |δ| only
            state.l1.put(2 * i, chunk.row_start, row_sums(magnitude, rows))
            kept = magnitude if keep is None else magnitude.mul_(_factor(keep, magnitude))
            state.l1.put(2 * i + 1, chunk.row_start, row_sums(kept, rows))

    def update_raw(
        self,
        state: _SparseState,
        pass_index: int,
        raw: Sequence[Any],
        codes: Sequence[str],
        params: Mapping[str, Any],
        chunk: ChunkInfo,
    ) -> bool:
        """``update`` from the inputs' raw bytes (the base first) by the native kernel; False (nothing
        recorded) when some sparsifier or dtype has no kernel."""
        if pass_index >= len(state.phases):
            return True
        if len(raw) != len(state.sparsifiers) + 1 or not native_gta.supports(codes):
            return False
        phase = state.phases[pass_index]
        wanting = state.wanting(phase)
        if phase != "rescale":
            if not all(hasattr(s, "count_raw") for _, s in wanting):
                return False
            commits = []
            for i, sparsifier in wanting:  # every model counted before any count is recorded
                commit = sparsifier.count_raw(phase, raw, codes, i, chunk)  # type: ignore[attr-defined]
                if commit is None:
                    return False
                commits.append(commit)
            for commit in commits:
                commit()
            return True
        masks = [_native_mask(s, chunk) for _, s in wanting]
        if any(m is None for m in masks):  # decided before anything is recorded
            return False
        rows = slice(chunk.row_start, chunk.row_end)
        for (i, _), mask in zip(wanting, masks, strict=True):
            before, after = state.l1.values[2 * i, rows], state.l1.values[2 * i + 1, rows]
            native_gta.row_l1(raw, codes, i, chunk, mask, before, after)
        return True

    def finish_pass(self, state: _SparseState, pass_index: int) -> None:
        phase = state.phases[pass_index] if pass_index < len(state.phases) else "rescale"
        if phase == "rescale":
            return
        for _, sparsifier in state.wanting(phase):
            sparsifier.settle(phase)
        # Later phases that no sparsifier wants any more are not made.
        later = [p for p in state.phases[pass_index + 1 :] if state.wanting(p)]
        state.phases[pass_index + 1 :] = later
        self.passes = len(state.phases)

    def result(self, state: _SparseState) -> SparseStats:
        scales: list[float | None] = [None] * len(state.sparsifiers)
        if state.rescale:
            for i in state.active:
                before, after = state.l1.total(2 * i), state.l1.total(2 * i + 1)
                if before >= _RESCALE_EPS and after >= _RESCALE_EPS:
                    scales[i] = before / after
        return SparseStats(tuple(state.sparsifiers), tuple(scales))


def _factor(keep: Tensor, like: Tensor) -> Tensor:
    """The mask as the 1.0/0.0 multiplier a boolean mask would be (NaN·0 stays NaN, as before)."""
    return keep_factor(keep) if like.dtype == torch.float32 else (keep != 0)


def make_sparsifier(
    kind: str, shape: Sequence[int], params: Mapping[str, Any], i: int, native: bool = True
) -> Sparsifier | None:
    """Model i's sparsifier for this tensor, or ``None`` when its density is ≥ 1 (δ kept whole); ``native``:
    whether a DELLA sparsifier may rank with the native kernel."""
    density = float(params["density"][i])
    if density >= 1:
        return None
    n = math.prod(shape)
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
        if (problem := della_window_problem(density, epsilon)) is not None:
            raise MethodInputError(f"della: {problem}")
        whole = len(shape) < 2
        fiber = n if whole else shape[1]
        return DellaSparsifier(i, density, epsilon, whole=whole, native=native, rows=tensor_rows(shape), fiber=fiber)
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
            apply_keep_(delta, sparsifier.keep_mask(delta, chunk))
            if (scale := stats.scales[i]) is not None:
                delta.mul_(scale)
        if weight[i] != 1:  # x·1 == x bit for bit: skip a pass over the data
            delta.mul_(weight[i])
        out.append(delta)
    return out


def mix(weighted: Sequence[Tensor], weight: Sequence[float], *, consensus: bool, normalize: bool) -> Tensor:
    """Σ of the weighted deltas: all of them, or (``consensus``) only those agreeing with the elected
    sign; divided, when ``normalize``, by Σ wᵢ (resp. by the agreeing wᵢ per element). Works in place:
    the deltas are consumed."""
    if not consensus:
        total = accumulate_(weighted)
        divisor = math.fsum(weight)
        if normalize and abs(divisor) >= 1e-8:
            divide_(total, divisor)
        return total
    masks = agreement_masks(weighted) if all(map(math.isfinite, weight)) else None  # 0·inf must stay NaN
    if masks is None:
        return _agreeing_mix(weighted, weight, normalize=normalize)
    total = apply_keep_(weighted[0], masks[0])
    for d, m in zip(weighted[1:], masks[1:], strict=True):
        total.add_(apply_keep_(d, m))
    if normalize:
        total.div_(agreeing_weight_sum(masks, weight, zero_as_one=True))
    return total


def _agreeing_mix(weighted: Sequence[Tensor], weight: Sequence[float], *, normalize: bool) -> Tensor:
    """The consensus mix by its definition, on booleans: for deltas that are not float32 or whose
    vote is not finite (``agreement_masks`` gives the same bits for the others, faster)."""
    agree = sign_agreement(weighted)
    total = torch.where(agree[0], weighted[0], 0.0)
    divisor = agree[0].to(total.dtype) * weight[0]
    for d, a, w in zip(weighted[1:], agree[1:], weight[1:], strict=True):
        total.add_(torch.where(a, d, 0.0))
        divisor.add_(a.to(total.dtype) * w)
    if normalize:
        total.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return total


def generalized_task_arithmetic(method: GtaMethod) -> Implementation:
    """The tensor function and statistic of one member of the family (``catalog.GTA_FAMILY``): the
    statistic makes the ``method.sparsifier`` masks (and L1 rescale factors), the function applies them
    and mixes, with TIES sign election when ``method.consensus``."""

    def merge(
        base: Tensor,
        models: Sequence[Tensor],
        *,
        weight: Sequence[float],
        normalize: bool,
        lambda_: float,
        chunk: ChunkInfo | None = None,
        stats: SparseStats | None = None,
        **_sparsification: Any,  # density, rescale, gamma, epsilon, int8_mask: the statistic's
    ) -> Tensor:
        if stats is None:
            raise TypeError(
                f"{method.name} needs its statistic: run it through its MethodSpec (executor, merge_in_chunks)"
            )
        deltas = sparse_deltas(base, models, weight, stats, chunk)
        mixed = mix(deltas, weight, consensus=method.consensus, normalize=normalize)
        if lambda_ != 1:
            mixed.mul_(lambda_)
        return mixed.add_(base)

    merge.__name__ = merge.__qualname__ = method.name
    merge.__doc__ = method.summary
    kernel = GtaKernel(method.consensus) if method.sparsifier in ("magnitude", "magnitude_outliers", "random") else None
    return Implementation(merge, statistic=StatisticFactory(SparseStatistic, method.sparsifier), native=kernel)


def _native_mask(sparsifier: Sparsifier | None, chunk: ChunkInfo) -> NativeMask | None:
    """The sparsifier's mask for the kernel (``None``: it has none for this chunk)."""
    if sparsifier is None:
        return KEEP_ALL
    describe = getattr(sparsifier, "native_mask", None)
    return None if describe is None else describe(chunk)


@dataclass(frozen=True)
class GtaKernel:
    """The family's native merge (``kernels/gta.c``) for the sparsifiers that describe their masks to it
    (TIES, DARE, Breadcrumbs; DELLA stays on torch): ``Implementation.native``."""

    consensus: bool

    def prepare(
        self, has_base: bool, n_models: int, params: Mapping[str, Any], in_codes: Sequence[str], out_code: str
    ) -> NativeMerge | None:
        weight = tuple(float(w) for w in params["weight"])
        if not has_base or len(in_codes) != n_models + 1 or not native_gta.supports(in_codes, out_code):
            return None
        if self.consensus and not native_gta.finite(weight):  # mix() takes _agreeing_mix: 0·inf stays NaN
            return None
        divisor = None
        if not self.consensus and params["normalize"] and abs(math.fsum(weight)) >= 1e-8:
            divisor = math.fsum(weight)
        lam = float(params["lambda"])
        return _GtaMerge(
            self.consensus,
            bool(params["normalize"]),
            weight,
            divisor,
            None if lam == 1 else lam,
            tuple(in_codes),
            out_code,
        )


@dataclass(frozen=True)
class _GtaMerge:
    consensus: bool
    normalize: bool
    weight: tuple[float, ...]
    divisor: float | None
    lambda_: float | None
    codes: tuple[str, ...]
    out_code: str

    def __call__(self, raw: Sequence[Any], out: Any, chunk: ChunkInfo, stats: SparseStats) -> Any:
        masks = [_native_mask(s, chunk) for s in stats.sparsifiers]
        if any(m is None for m in masks):
            return None
        # sparse_deltas' order: mask, rescale (when the statistic set a factor), weight (when ≠ 1).
        specs = [
            m.spec(scale if s is not None else None, w if w != 1 else None)  # type: ignore[union-attr]
            for m, s, scale, w in zip(masks, stats.sparsifiers, stats.scales, self.weight, strict=True)
        ]
        return native_gta.run_merge(
            raw,
            self.codes,
            out,
            self.out_code,
            chunk,
            specs,
            self.weight,
            consensus=self.consensus,
            normalize_agreeing=self.consensus and self.normalize,
            divisor=self.divisor,
            lambda_=self.lambda_,
        )


# ---------------------------------------------------------------------------------------------
# SCE: select by variance across models, weight by energy, erase minority signs


def variance_key(deltas: Sequence[Tensor], wide: Sequence[Tensor] | None = None) -> Tensor:
    """Bit patterns (float32) of the population variance across models, per element, computed in float64:
    mean = Σ δᵢ / n, var = Σ (δᵢ − mean)² / n. ``wide``: the deltas already widened to float64 (not
    modified); widening once and then working in one dtype avoids torch's slower mixed-dtype kernels."""
    if wide is None:
        wide = [d.to(torch.float64) for d in deltas]
    mean = wide[0].clone() if len(wide) == 1 else torch.add(wide[0], wide[1])
    for w in wide[2:]:
        mean.add_(w)
    divide_(mean, len(wide))
    var = torch.sub(wide[0], mean)
    var.mul_(var)  # 0 + c² == c²: the first term needs no zero to start from
    if len(wide) > 1:
        centred = torch.empty_like(mean)
        for w in wide[1:]:
            torch.sub(w, mean, out=centred)
            var.add_(centred.mul_(centred))
    return float_key(divide_(var, len(wide)))


@dataclass(frozen=True)
class SceStats:
    selector: TopK | None  # None: no selection (select_topk ≥ 1)
    weights: tuple[float, ...]
    native: bool = True  # variance keys by the native statistics kernel (the same bits)


def sce_keys(deltas: Sequence[Tensor], native: bool) -> Tensor:
    """``variance_key`` of float32 deltas by the native kernel where it takes them (``native_stats.variance_keys``:
    one pass instead of a dozen float64 ones; it declines chunks with a NaN variance), else by torch."""
    keys = native_stats.variance_keys(deltas) if native else None
    return keys if keys is not None else variance_key(deltas)


@dataclass
class _SceState:
    n: int
    rows: int
    select: float
    phases: list[str]
    selector: TopK | None
    energy: RowPartials  # per model, per row: Σ (masked δᵢ)²
    nonzero: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class SceStatistic:
    """Passes: (select_topk in (0, 1)) histogram of the variance's high bits and count of non-zero
    variances, then its low bits, then (only if the threshold splits tied variances) per-row tie counts;
    finally each model's per-row Σ δ² after selection."""

    passes = 4
    concurrent = True
    native = True  # variance keys by the native statistics kernel (the executor sets it from --no-native)

    def begin(self, shape: tuple[int, ...], n_models: int, params: Mapping[str, Any]) -> _SceState:
        select = float(params["select_topk"])
        n, rows = math.prod(shape), tensor_rows(shape)
        if select >= 1:
            phases, selector = ["energy"], None
        elif select <= 0:
            phases, selector = [], TopK(n, rows, [0])
        else:
            phases, selector = ["high", "low", "ties", "energy"], TopK(n, rows, [])
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
        deltas = [(m - base).contiguous() for m in models]
        phase = state.phases[pass_index]
        selector = state.selector
        rows = chunk_rows(chunk)
        keep: Tensor | None = None
        if selector is not None:
            keys = sce_keys(deltas, self.native)
            if phase == "high":
                selector.count_high(keys)
                nonzero = int(torch.count_nonzero(keys))
                with state.lock:
                    state.nonzero += nonzero
                return
            if phase == "low":
                selector.count_low(keys)
                return
            if phase == "ties":
                selector.count_ties(keys, chunk.row_start, rows)
                return
            keep = selector.masks(keys, chunk.row_start, rows)[0]
        factor = None if keep is None else _factor(keep, models[0]).to(torch.float64)
        wide = [d.to(torch.float64) for d in deltas]  # δᵢ exactly, widened once
        for i, w in enumerate(wide):
            square = w.mul_(w)  # exact for float32 deltas, as δ.double()·δ.double()
            if factor is not None:
                square.mul_(factor)  # ·1.0 or ·0.0, as by a boolean mask (NaN·0 stays NaN)
            state.energy.put(i, chunk.row_start, row_sums(square, rows))

    def finish_pass(self, state: _SceState, pass_index: int) -> None:
        phase = state.phases[pass_index] if pass_index < len(state.phases) else None
        selector = state.selector
        if selector is None or phase not in ("high", "low", "ties"):
            return
        if phase == "high":
            selector.choose([int(state.nonzero * state.select)])
            selector.settle_high()
        elif phase == "low":
            selector.settle_low()
        else:
            selector.settle_ties()
        # Selection passes the chosen k no longer needs (all or nothing selected, no split tie) are not made.
        later = state.phases[pass_index + 1 :]
        state.phases[pass_index + 1 :] = [p for p in later if p == "energy" or selector.wants(p)]
        self.passes = len(state.phases)

    def result(self, state: _SceState) -> SceStats:
        count = state.energy.values.shape[0]
        means = [state.energy.total(i) / state.n for i in range(count)] if "energy" in state.phases else [0.0] * count
        total = math.fsum(means)
        weights = [1.0 / count] * count if abs(total) < 1e-6 else [m / total for m in means]
        return SceStats(state.selector, tuple(weights), self.native)


def sce(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    chunk: ChunkInfo | None = None,
    stats: SceStats | None = None,
    **_selection: Any,  # select_topk (the statistic's) and int8_mask
) -> Tensor:
    """base + Σᵢ ωᵢ·[agrees]·δᵢ / max(Σᵢ ωᵢ·[agrees], 1e-6), with ωᵢ = mean(δᵢ²)/Σⱼ mean(δⱼ²) over the
    selected δ (uniform when that sum is < 1e-6); nnz counts the elements of non-zero variance.
    """
    if stats is None or chunk is None:
        raise TypeError("sce needs its statistic and chunk: run it through its MethodSpec (executor, merge_in_chunks)")
    deltas = [m - base for m in models]
    if stats.selector is not None:
        keys = sce_keys([d.contiguous() for d in deltas], stats.native)
        keep = stats.selector.masks(keys, chunk.row_start, chunk_rows(chunk))[0]
        for d in deltas:
            apply_keep_(d, keep)
    masks = agreement_masks(deltas) if all(map(math.isfinite, stats.weights)) else None  # 0·NaN must stay NaN
    if masks is None:
        return _sce_mix_by_definition(deltas, stats.weights).add_(base)
    for d, m, w in zip(deltas, masks, stats.weights, strict=True):
        if w != 1:
            d.mul_(w)
        apply_keep_(d, m)  # ωᵢ·δᵢ where it agrees, +0.0 elsewhere
    total = accumulate_(deltas)
    return total.div_(agreeing_weight_sum(masks, stats.weights, zero_as_one=False).clamp_(min=1e-6)).add_(base)


def _sce_mix_by_definition(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σᵢ ωᵢ·[agrees]·δᵢ / max(Σᵢ ωᵢ·[agrees], 1e-6) on booleans, for deltas ``agreement_masks`` does not take."""
    agree = sign_agreement(deltas)
    total = torch.where(agree[0], deltas[0] * weights[0], 0.0)
    divisor = agree[0].to(total.dtype) * weights[0]
    for d, a, w in zip(deltas[1:], agree[1:], weights[1:], strict=True):
        total.add_(torch.where(a, d * w, 0.0))
        divisor.add_(a.to(total.dtype) * w)
    return total.div_(divisor.clamp_(min=1e-6))


IMPLEMENTATIONS = {
    **{method.name: generalized_task_arithmetic(method) for method in GTA_FAMILY},
    "sce": Implementation(sce, statistic=SceStatistic),
}
