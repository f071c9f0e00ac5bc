"""Arcee Fusion (mergekit's ``arcee_fusion``): the base model, except where the other model departs from it
in an unusually important way.

Per tensor, with b the base and m the other model (float32 in our compute):

* each element's importance is |m − b| times the KL divergence between the softmaxes of the fibers along
  the last dim that hold it (the whole vector for a 1-D tensor): KL = Σ p·log(p/q), p = softmax(m) + 1e-8,
  q = softmax(b) + 1e-8;
* threshold = median + 1.5·(q₃ − q₁) of all the importances, quantile q being ``sorted[⌊q·(N − 1)⌋]``;
* result = b + (m − b)·[importance ≥ threshold].

Exactness. The quantiles are exact order statistics found by radix select over integer histograms of the
importances' float32 bit patterns (``primitives.TopK``), never by a sort. The KL needs exp and log per
element, and torch's own differ between CPU and GPU in the last bits (and may between a CPU kernel's
vectorised body and its tail), so here they are built from IEEE additions, multiplications and divisions
(range reduction and a polynomial, in float64) and bit operations: each element's value is a pure function
of its inputs, on every device and however the tensor is cut. The KL costs about 50 ns per element on one
CPU core, once per tensor (in the "high" pass); the whole merge takes 3–4 times as long as TIES on the CPU.
Per-fiber sums use ``pairwise_sum``. A fiber lies inside one chunk unless the tensor is 1-D; then a
statistic pass gathers the vector first.

The KL is float64 throughout, and summed without cancellation (``fiber_kl``): between a model and its
fine-tune it is 10⁴–10⁶ times smaller than the terms of Σ p·log(p/q), which in float32 (or mergekit's
bf16) leave it mostly rounding noise.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mergekitlite.methods.primitives import ABS_BITS, INF_BITS, NAN_KEY, ONE_BITS, TopK, float32_bits, pairwise_sum
from mergekitlite.methods.registry import ChunkInfo, Implementation, tensor_rows

_EPS = 1e-8  # mergekit's, added to both softmaxes

# ---------------------------------------------------------------------------------------------
# exp and log from IEEE basic operations (float64)

# ln 2 split so that n·_LN2_HI is exact for |n| < 2²¹ (its last 21 bits are zero): the reduced argument
# x − n·ln 2 then loses nothing to the product's rounding (the classic Cody–Waite constants).
_LN2_HI = float.fromhex("0x1.62e42fee00000p-1")
_LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")
_INV_LN2 = 1.0 / math.log(2.0)
# Taylor coefficients 1/k!: on |r| ≤ ln 2 / 2 the first omitted term, r¹³/13!, is below 2e-16.
_EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(13))
# Below this, eˣ ≤ 1.6e-28 cannot change p = eˣ/Z + 1e-8 nor Z ≥ 1 in float64: clamping keeps 2ⁿ normal.
_EXP_FLOOR = -64.0
# ln y = 2·atanh((y − 1)/(y + 1)) = 2f·Σ f²ᵏ/(2k + 1); for y in [√½, √2), f² ≤ 0.0295 and ten terms reach 1e-17.
_ATANH_SERIES = tuple(1.0 / (2 * k + 1) for k in range(10))
_SQRT2 = math.sqrt(2.0)
_F64_MANTISSA = (1 << 52) - 1
_F64_ONE = 1023 << 52  # exponent bits of 1.0


def exp_nonpositive(x: Tensor) -> Tensor:
    """eˣ for float64 x ≤ 0 (NaN stays NaN), overwriting x: eˣ = 2ⁿ·eʳ with n = round(x/ln 2), r = x − n·ln 2,
    eʳ by its Taylor polynomial and 2ⁿ built from its bits. Relative error about 5e-16."""
    x.clamp_(min=_EXP_FLOOR)
    n = torch.mul(x, _INV_LN2).round_()
    t = torch.mul(n, _LN2_HI)
    x.sub_(t)
    x.sub_(torch.mul(n, _LN2_LO, out=t))
    poly = torch.mul(x, _EXP_TAYLOR[-1], out=t).add_(_EXP_TAYLOR[-2])
    for c in reversed(_EXP_TAYLOR[:-2]):
        poly.mul_(x).add_(c)
    # n in [−92, 0]: 2ⁿ is a normal float64, and multiplying by it is exact. A NaN's n converts to some
    # integer, but NaN·2ⁿ is NaN whatever 2ⁿ is.
    scale = n.to(torch.int64).add_(1023).bitwise_left_shift_(52)
    return poly.mul_(scale.view(torch.float64))


def log_positive(y: Tensor) -> Tensor:
    """ln y for positive normal float64 y, overwriting y: y = 2ᵉ·m with m in [√½, √2) read off the bits,
    ln y = e·ln 2 + 2·atanh((m − 1)/(m + 1)). Relative error about 5e-16, also near y = 1 (where the KL's
    terms live). NaN is not kept: the caller propagates it."""
    bits = y.view(torch.int64)
    e = bits.bitwise_right_shift(52).sub_(1023)
    bits.bitwise_and_(_F64_MANTISSA).bitwise_or_(_F64_ONE)  # y = m in [1, 2)
    halve = torch.gt(y, _SQRT2).to(torch.int64)
    e.add_(halve)
    bits.sub_(halve.bitwise_left_shift_(52))  # m/2 where m > √2: an exponent decrement, exact
    f = torch.sub(y, 1.0)  # exact for m in [√½, √2) (Sterbenz)
    f.div_(y.add_(1.0))
    f2 = torch.mul(f, f, out=halve.view(torch.float64))
    series = torch.mul(f2, _ATANH_SERIES[-1], out=y).add_(_ATANH_SERIES[-2])
    for c in reversed(_ATANH_SERIES[:-2]):
        series.mul_(f2).add_(c)
    log_m = series.mul_(f).mul_(2.0)
    e_wide = f.copy_(e)  # the exponent as float64 (exact), in f's buffer
    log_m.add_(torch.mul(e_wide, _LN2_LO, out=f2))  # small part first: e·ln 2 splits as for exp
    return log_m.add_(e_wide.mul_(_LN2_HI))


# ---------------------------------------------------------------------------------------------
# KL divergence per fiber


def _block_elements(device: torch.device) -> int:
    """Elements of the float64 work arrays made at a time: on the CPU, a few of them stay in the core's cache
    (2¹⁸–2²⁰ ran 1.3–2x slower here); a GPU wants larger kernels, but each worker holds ~5 such arrays
    outside the per-chunk memory model: at 2²⁰, 16 workers overran --max-vram 2GB on an H200. Either way the
    working space of the KL does not grow with the chunk."""
    return 1 << 16 if device.type == "cpu" else 1 << 18


def _softmax_eps(x: Tensor) -> Tensor:
    """softmax(x) + 1e-8 along the last dim in float64 (all NaN in a row holding NaN or +inf, or all −inf)."""
    shifted = x.to(torch.float64, copy=True).sub_(x.amax(dim=-1, keepdim=True))  # float32 max widened exactly
    e = exp_nonpositive(shifted)
    return e.div_(pairwise_sum(e).unsqueeze(-1)).add_(_EPS)


def fiber_kl(model: Tensor, base: Tensor) -> Tensor:
    """KL(softmax(model) + ε ‖ softmax(base) + ε) of each row of two [fibers, length] float32 blocks, as float32
    (rounded once from float64), on the blocks' device. Rows are independent, so any split gives the same bits.

    Summed as Σ q·φ(p/q), φ(u) = u·ln u − u + 1 ≥ 0: the same value as Σ p·ln(p/q), since Σ p = Σ q, but
    a sum of non-negative terms, each ≈ q·(u − 1)²/2 with float64's relative error over |u − 1| (float32's
    precision or better while |u − 1| > 1e-8). The plain sum cancels its first-order terms (a fine-tune's
    small differences leave a KL 10⁴–10⁶ times smaller than its terms) and lost 2e-6 of it in float64 in
    tests/test_methods_fusion.py; this form gets the KL correctly rounded to float32 there."""
    fibers, length = model.shape
    out = torch.empty(fibers, dtype=torch.float64, device=model.device)
    step = max(1, _block_elements(model.device) // max(length, 1))
    for start in range(0, fibers, step):
        stop = min(fibers, start + step)
        p = _softmax_eps(model[start:stop])
        q = _softmax_eps(base[start:stop])
        u = torch.div(p, q, out=p)
        w = torch.sub(u, 1.0)  # exact near u = 1 (Sterbenz), where it matters
        phi = log_positive(u).mul_(w + 1.0).sub_(w)  # − w also carries a NaN ratio, which log_positive drops
        out[start:stop] = pairwise_sum(phi.mul_(q))
    # φ ≥ 0, but its rounding can leave a tiny negative term, and a negative KL would sort below +0.0's bits.
    return out.clamp_(min=0.0).add_(0.0).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Importance keys, quantiles and the mask


@dataclass(frozen=True)
class KlTable:
    """The KL of every fiber along the last dim (float32, on the CPU), and where a chunk's fibers are in it."""

    kl: Tensor
    whole: bool  # 1-D tensor: one fiber, cut across the chunks
    fiber: int  # elements per fiber

    def of_chunk(self, chunk: ChunkInfo, numel: int) -> tuple[Tensor, int]:
        """The chunk's KLs and the length to cut its elements into (a 1-D chunk: one piece of the fiber)."""
        if self.whole:
            return self.kl, numel
        start = chunk.flat_start // self.fiber
        return self.kl[start : start + numel // self.fiber], self.fiber


def importance_keys(model: Tensor, base: Tensor, kl: Tensor, fiber: int) -> Tensor:
    """Bit patterns (int32, shaped like the inputs) of the float32 importances |m − b|·KL. Both factors are ≥ 0,
    so the bits order like the values; clearing the sign bit folds −0.0 (and negative NaNs) into +0.0's order,
    and every NaN gets one key (NaN payloads differ between devices)."""
    importance = torch.sub(model, base).abs_().contiguous()
    importance.reshape(-1, fiber).mul_(kl.to(importance.device).unsqueeze(-1))  # a view: contiguous
    return importance.view(torch.int32).bitwise_and_(ABS_BITS).clamp_(max=NAN_KEY)


def keep_mask(keys: Tensor, threshold_key: int) -> Tensor:
    """Bit mask (int32: all ones = keep) of the keys in [threshold_key, +inf's key]: importance ≥ threshold,
    which is false for NaN. Overwrites ``keys``. Keys and threshold lie in [0, NAN_KEY]: no overflow."""
    reach = torch.sub(keys, threshold_key)  # ≥ 0 where the importance reaches the threshold
    finite = keys.neg_().add_(INF_BITS)  # ≥ 0 where it is not NaN
    return reach.bitwise_or_(finite).bitwise_right_shift_(31).bitwise_not_()


def quantile_positions(n: int) -> tuple[int, int, int]:
    """mergekit's ``⌊q·(N − 1)⌋`` for the median, q₁ and q₃, in integers (exact for any N)."""
    last = max(n - 1, 0)
    return last // 2, last // 4, 3 * last // 4


class Quantiles:
    """Exact order statistics ``sorted(keys)[j]`` for given positions j, of non-negative int32 keys seen in
    whole-row chunks in any order, concurrently: TopK's (N − j)-th largest by radix select, or (j = 0, which
    TopK does not select) the minimum, an integer reduction."""

    def __init__(self, n: int, rows: int, positions: Sequence[int]) -> None:
        self.n = n
        self.selector = TopK(n, rows, [n - j for j in positions])
        self.wants_min = n > 0 and 0 in positions
        self.minimum = NAN_KEY  # the largest key there is
        self._lock = threading.Lock()

    def count_high(self, keys: Tensor) -> None:
        self.selector.count_high(keys)
        if self.wants_min and keys.numel():
            smallest = int(keys.min())
            with self._lock:
                self.minimum = min(self.minimum, smallest)

    def settle_high(self) -> None:
        self.selector.settle_high()

    @property
    def wants_low(self) -> bool:
        """Whether the second pass is needed (known after ``settle_high``): not when only minima are asked."""
        return self.selector.wants("low")

    def count_low(self, keys: Tensor) -> None:
        self.selector.count_low(keys)

    def settle_low(self) -> None:
        self.selector.settle_low()

    def selected(self) -> list[int]:
        return [self.minimum if q.k == self.n else q.threshold for q in self.selector.queries]


def key_value(key: int) -> float:
    """The float32 whose bit pattern is ``key``."""
    return float(struct.unpack("<f", struct.pack("<i", key))[0])


def fusion_threshold(median: float, q1: float, q3: float) -> float:
    """median + 1.5·IQR, in float64 (mergekit computes it in the tensor's dtype)."""
    return median + 1.5 * (q3 - q1)


def ceil_key(threshold: float) -> int:
    """Bit pattern of the smallest float32 ≥ ``threshold`` (≥ 0), so that comparing float32 importances with it
    is comparing them with the float64 threshold; NaN's key (nothing is kept) for a NaN threshold."""
    if math.isnan(threshold):
        return NAN_KEY
    key = float32_bits(threshold)  # nearest; above FLT_MAX: +inf
    return key + 1 if key_value(key) < threshold else key


# ---------------------------------------------------------------------------------------------
# The statistic and the method


@dataclass(frozen=True)
class FusionStats:
    table: KlTable
    quantiles: tuple[float, float, float]  # median, q₁, q₃ of the importances
    threshold: float
    threshold_key: int


@dataclass
class _FusionState:
    n: int
    phases: list[str]
    table: KlTable
    quantiles: Quantiles
    vectors: Tensor | None = None  # 1-D: [model, base] on the CPU, until the softmax pass is settled


class FusionStatistic:
    """Passes: ("softmax", 1-D tensors only) gather the vector, whose one fiber spans the chunks, and take its
    KL; "high": each fiber's KL (kept per fiber, disjoint slices) and the histogram of the importances' high
    16 bits (with their minimum where a quantile is the smallest element); "low": the histogram of the low
    16 bits inside each quantile's bin, skipped when no quantile needs it (N ≤ 2)."""

    passes = 3  # the most a tensor needs; ``begin`` and ``finish_pass`` set it for the tensor at hand
    concurrent = True

    def begin(self, shape: tuple[int, ...], n_models: int, params: Mapping[str, Any]) -> _FusionState:
        n = math.prod(shape)
        whole = len(shape) == 1
        fiber = shape[-1] if len(shape) >= 2 else 1  # a scalar: one fiber of one element
        fibers = 1 if whole else (n // fiber if fiber else 0)
        table = KlTable(torch.zeros(fibers, dtype=torch.float32), whole, fiber)
        phases = [] if n == 0 else ["softmax", "high", "low"] if whole else ["high", "low"]
        rows = tensor_rows(shape)
        state = _FusionState(n, phases, table, Quantiles(n, rows, quantile_positions(n)))
        if whole and n:
            state.vectors = torch.empty(2, n, dtype=torch.float32)
        self.passes = len(phases)
        return state

    def update(
        self,
        state: _FusionState,
        pass_index: int,
        base: Tensor | None,
        models: list[Tensor],
        params: Mapping[str, Any],
        chunk: ChunkInfo,
    ) -> None:
        if pass_index >= len(state.phases):
            return
        assert base is not None
        model = models[0]
        phase = state.phases[pass_index]
        if phase == "softmax":
            assert state.vectors is not None
            state.vectors[0, chunk.row_start : chunk.row_end] = model.reshape(-1)
            state.vectors[1, chunk.row_start : chunk.row_end] = base.reshape(-1)
            return
        table = state.table
        if phase == "high" and not table.whole:
            kl = fiber_kl(model.reshape(-1, table.fiber), base.reshape(-1, table.fiber))
            start = chunk.flat_start // table.fiber
            table.kl[start : start + kl.numel()] = kl.cpu()  # this chunk's fibers alone: no lock
            fiber = table.fiber
        else:
            kl, fiber = table.of_chunk(chunk, model.numel())
        keys = importance_keys(model, base, kl, fiber)
        if phase == "high":
            state.quantiles.count_high(keys)
        else:
            state.quantiles.count_low(keys)

    def finish_pass(self, state: _FusionState, pass_index: int) -> None:
        phase = state.phases[pass_index] if pass_index < len(state.phases) else None
        if phase == "softmax":
            assert state.vectors is not None
            state.table.kl.copy_(fiber_kl(state.vectors[0:1], state.vectors[1:2]))
            state.vectors = None
        elif phase == "high":
            state.quantiles.settle_high()
            if not state.quantiles.wants_low:
                state.phases.remove("low")
                self.passes = len(state.phases)
        elif phase == "low":
            state.quantiles.settle_low()

    def result(self, state: _FusionState) -> FusionStats:
        if state.n == 0:
            return FusionStats(state.table, (math.nan,) * 3, math.nan, NAN_KEY)
        median, q1, q3 = (key_value(k) for k in state.quantiles.selected())
        threshold = fusion_threshold(median, q1, q3)
        return FusionStats(state.table, (median, q1, q3), threshold, ceil_key(threshold))


def arcee_fusion(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    chunk: ChunkInfo | None = None,
    stats: FusionStats | None = None,
) -> Tensor:
    """base + δ·[|δ|·KL ≥ median + 1.5·IQR], δ = model − base, the KL taken between the softmaxes (+1e-8) of the
    model's and the base's fibers along the last dim (the whole vector for 1-D tensors). Differences from
    mergekit: the quantiles are exact over all N importances (mergekit takes them from a random, unseeded
    sample of 10⁶ elements when N > 10⁶, so its result is not reproducible there); the KL is computed in
    float64 and the importances in float32 (mergekit: all in the inputs' dtype, usually bf16, where the KL
    is mostly rounding noise), and the threshold in float64.
    """
    if stats is None or chunk is None:
        raise TypeError("arcee_fusion needs its statistic and chunk: run it through its MethodSpec (merge_in_chunks)")
    model = models[0]
    if model.numel() == 0:
        return torch.sub(model, base)
    kl, fiber = stats.table.of_chunk(chunk, model.numel())
    keep = keep_mask(importance_keys(model, base, kl, fiber), stats.threshold_key)
    factor = keep.bitwise_and_(ONE_BITS).view(torch.float32)  # 1.0 / 0.0: NaN·0 stays NaN, as in mergekit
    return torch.sub(model, base).mul_(factor).add_(base)


IMPLEMENTATIONS = {"arcee_fusion": Implementation(arcee_fusion, statistic=FusionStatistic)}
