"""Building blocks shared by the merge methods, each written once.

Everything here gives bit-identical results however a tensor is cut into row chunks, and the same
bits on CPU and GPU:

* reductions are float64 additions in a fixed pairwise tree that depends only on the length summed
  (torch's own ``sum`` picks its blocking and threading from the tensor's size, so a row summed
  inside a 1-row chunk and inside a 100-row chunk could round differently);
* exact top-k selection uses integer histograms of float32 bit patterns (radix select), never a sort;
* random numbers are a pure function of (seed, stream, flat element index): a splitmix64 counter hash,
  never a stateful generator.

Transcendental functions (acos, sin...) are only ever applied to Python floats or to one fixed array
per tensor, because torch's vectorised kernels may round the tail of a tensor differently from its body.

Statistics built from these parts are *concurrent*: their updates for different chunks of a pass may
run at the same time, in any order. Integer counts are added under a lock; float partials are written
per row, to disjoint slices, and reduced once in a fixed order; anything that needs the rows in order
(the rank of a tied key) is computed from per-row counts after the pass.

Masks are int32 tensors of all-one bits (keep) or zeros, not booleans: on the CPU, torch's boolean
kernels (comparisons, ``where``, ``masked_fill``) are several times slower than integer arithmetic on
the same elements, and a float32 tensor is masked by one bitwise AND of its bit patterns.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mergekitlite.methods import native_gram
from mergekitlite.methods.registry import ChunkInfo, tensor_rows

# ---------------------------------------------------------------------------------------------
# Statistic factories


class StatisticFactory:
    """``MethodSpec.statistic``: makes one fresh statistic per tensor, ``cls(*args)``. It carries the
    class's ``concurrent`` flag so that the executor can read it before any statistic is made."""

    def __init__(self, cls: Callable[..., Any], *args: Any) -> None:
        self.cls = cls
        self.args = args
        self.concurrent: bool = bool(getattr(cls, "concurrent", False))

    def __call__(self) -> Any:
        return self.cls(*self.args)

    def __repr__(self) -> str:
        return f"StatisticFactory({getattr(self.cls, '__name__', self.cls)!r}, concurrent={self.concurrent})"


# ---------------------------------------------------------------------------------------------
# Exact, chunk-independent reductions


def pairwise_sum(x: Tensor) -> Tensor:
    """Σ over the last dim in float64, by a fixed pairwise tree: pad with zeros to a power of two,
    then add the two halves until one element is left. The tree depends only on the length summed.

    The first level adds the upper half straight into a float64 copy of the lower half (exact: the
    addend is widened first) and later levels add in place, so only one buffer of half the input is made."""
    n = x.shape[-1]
    if n == 0:
        return torch.zeros(x.shape[:-1], dtype=torch.float64, device=x.device)
    if n == 1:
        return x[..., 0].to(torch.float64)
    half = 1 << ((n - 1).bit_length() - 1)  # half the padded length: n - half ≤ half elements pair up
    acc = torch.empty((*x.shape[:-1], half), dtype=torch.float64, device=x.device)
    acc.copy_(x[..., :half])
    acc[..., : n - half].add_(x[..., half:])
    if n - half < half:
        acc[..., n - half :].add_(0.0)  # the padding's zeros: x + 0.0 turns −0.0 into +0.0, as the padded tree
    width = half
    while width > 1:
        width //= 2
        acc[..., :width].add_(acc[..., width : 2 * width])
    return acc[..., 0]


def chunk_rows(chunk: ChunkInfo) -> int:
    """Rows in the chunk (a scalar tensor is one row)."""
    return chunk.row_end - chunk.row_start


def row_sums(x: Tensor, rows: int) -> Tensor:
    """Per-row float64 sums of a chunk holding ``rows`` whole rows, on the CPU."""
    return pairwise_sum(x.reshape(rows, -1)).cpu()


class RowPartials:
    """Per-row float64 partial results of ``count`` quantities, filled chunk by chunk and combined once.
    Chunks write disjoint row slices, so concurrent ``put`` calls need no lock."""

    def __init__(self, count: int, rows: int) -> None:
        self.values = torch.zeros(count, rows, dtype=torch.float64)

    def put(self, index: int, row_start: int, sums: Tensor) -> None:
        self.values[index, row_start : row_start + sums.numel()] = sums

    def total(self, index: int) -> float:
        return float(pairwise_sum(self.values[index]))


def accumulate_(terms: Sequence[Tensor]) -> Tensor:
    """((t₀ + t₁) + t₂) + …, added left to right into ``terms[0]`` (overwritten, and returned): the order
    fixes the rounding."""
    total = terms[0]
    for t in terms[1:]:
        total.add_(t)
    return total


def divide_(x: Tensor, divisor: float) -> Tensor:
    """x /= divisor in place, correctly rounded on every device. CUDA turns division by a Python scalar
    into multiplication by its reciprocal (two roundings); a divisor on the tensor's device is divided."""
    return x.div_(torch.tensor(divisor, dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------------------------
# Bit masks (int32: all ones = keep, 0 = drop)

SIGN_BIT = -(1 << 31)  # the sign bit of a float32, as int32
ABS_BITS = 0x7FFFFFFF  # every bit but the sign: a float32's bits AND this are its magnitude's
ONE_BITS = 0x3F800000  # bit pattern of 1.0f
INF_BITS = 0x7F800000  # bit pattern of +inf: magnitude patterns above it are NaNs
NAN_KEY = INF_BITS + 1  # one key for every NaN magnitude: above +inf's, as torch's sort puts NaNs last


def float32_bits(value: float) -> int:
    """Bit pattern (int32) of ``value`` rounded to float32, as torch rounds a Python scalar."""
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32))


def above(keys: Tensor, threshold: int | Tensor) -> Tensor:
    """Mask of int32 ``keys`` > ``threshold`` (both in [−1, 2³¹)): the sign of threshold − keys, spread
    over all bits by an arithmetic shift. The difference cannot overflow in that range."""
    diff = torch.rsub(keys, threshold) if isinstance(threshold, int) else threshold - keys
    return diff.bitwise_right_shift_(31)


def apply_keep_(x: Tensor, keep: Tensor | None) -> Tensor:
    """x where ``keep``, +0.0 elsewhere (as ``masked_fill_(~keep, 0.0)``), in place."""
    if keep is None:
        return x
    if x.dtype == torch.float32:
        x.view(torch.int32).bitwise_and_(keep)
        return x
    return x.masked_fill_(keep == 0, 0.0)


def keep_factor(keep: Tensor) -> Tensor:
    """The mask as 1.0/0.0 float32 (the values a boolean mask takes in arithmetic)."""
    return (keep & ONE_BITS).view(torch.float32)


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers (splitmix64)

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# Elements hashed at a time on the CPU: the block's uint64 temporaries stay in the core's L2 cache.
_BLOCK = 1 << 15


def _signed(v: int) -> int:
    """A 64-bit pattern as the int64 torch stores it."""
    return v - (1 << 64) if v >= 1 << 63 else v


def splitmix64(x: int) -> int:
    """Reference splitmix64 output for state ``x`` (Python ints, mod 2⁶⁴)."""
    z = (x + _GAMMA) & _M64
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def stream_key(seed: int, stream: int) -> int:
    """Key of one random stream (e.g. one model's mask) of a tensor whose seed is ``seed``."""
    return splitmix64(splitmix64(seed & _M64) ^ (stream & _M64))


def _shr(x: Tensor, s: int) -> Tensor:
    # torch's >> on int64 is arithmetic: clear the copies of the sign bit to make it logical.
    return (x >> s).bitwise_and_((1 << (64 - s)) - 1)


def _hash_blocks(key: int, flat_start: int, count: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, splitmix64(key + i·γ) for the block's flat indices i) over ``count`` elements, as numpy
    uint64 (logical shifts and wrapping products in one operation each). The block array is reused:
    use it before asking for the next one."""
    z = np.empty(min(count, _BLOCK), dtype=np.uint64)
    t = np.empty_like(z)
    offset_term = np.uint64((key + _GAMMA) & _M64)
    for offset in range(0, count, _BLOCK):
        m = min(_BLOCK, count - offset)
        zb, tb = z[:m], t[:m]
        np.copyto(zb, np.arange(flat_start + offset, flat_start + offset + m, dtype=np.uint64))
        zb *= np.uint64(_GAMMA)
        zb += offset_term
        for shift, mix in ((30, _MIX1), (27, _MIX2)):
            np.right_shift(zb, np.uint64(shift), out=tb)
            zb ^= tb
            zb *= np.uint64(mix)
        np.right_shift(zb, np.uint64(31), out=tb)
        zb ^= tb
        yield offset, zb


def random_bits(key: int, flat_start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """53 random bits (int64 in [0, 2⁵³)) for flat indices ``flat_start ..``: element i gets the top 53 bits
    of splitmix64(key + i·γ). int64 products wrap mod 2⁶⁴, as the hash needs."""
    if torch.device(device).type != "cpu":
        return _random_bits_torch(key, flat_start, count, device)
    out = np.empty(count, dtype=np.uint64)
    for offset, z in _hash_blocks(key, flat_start, count):
        np.right_shift(z, np.uint64(11), out=out[offset : offset + z.size])
    return torch.from_numpy(out.view(np.int64))


def _random_bits_torch(key: int, flat_start: int, count: int, device: torch.device | str) -> Tensor:
    """``random_bits`` in torch int64 operations, for devices other than the CPU (same bits)."""
    z = torch.arange(flat_start, flat_start + count, dtype=torch.int64, device=device)
    z.mul_(_signed(_GAMMA)).add_(_signed((key + _GAMMA) & _M64))
    z.bitwise_xor_(_shr(z, 30)).mul_(_signed(_MIX1))
    z.bitwise_xor_(_shr(z, 27)).mul_(_signed(_MIX2))
    z.bitwise_xor_(_shr(z, 31))
    return _shr(z, 11)


def uniform(key: int, flat_start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """float64 uniforms in [0, 1): ``random_bits`` · 2⁻⁵³."""
    return random_bits(key, flat_start, count, device).to(torch.float64).mul_(2.0**-53)


def chunk_uniform(key: int, like: Tensor, chunk: ChunkInfo) -> Tensor:
    """Uniforms for the elements of a chunk ``like`` (same shape), from their flat indices in the tensor."""
    return uniform(key, chunk.flat_start, like.numel(), like.device).reshape(like.shape)


def probability_bound(p: float) -> int:
    """⌈p·2⁵³⌉ for p clamped to [0, 1]: u < p ⟺ bits < this bound (p·2⁵³ is exact)."""
    return math.ceil(min(max(p, 0.0), 1.0) * 2.0**53)


def bernoulli_mask(key: int, like: Tensor, chunk: ChunkInfo, p: float) -> Tensor:
    """Mask (int32, shaped like ``like``) of the chunk's elements whose uniform is < p, compared as
    integers. On the CPU the comparison is made on the whole 64-bit hash: bits < c ⟺ hash < c·2¹¹."""
    bound = probability_bound(p)
    if bound == 0:
        return torch.zeros(like.shape, dtype=torch.int32, device=like.device)
    if bound >= 1 << 53:
        return torch.full(like.shape, -1, dtype=torch.int32, device=like.device)
    count = like.numel()
    if like.device.type != "cpu":
        bits = _random_bits_torch(key, chunk.flat_start, count, like.device)
        return (bits < bound).to(torch.int32).neg_().reshape(like.shape)
    out = np.empty(count, dtype=np.int32)
    limit = np.uint64(bound << 11)
    for offset, z in _hash_blocks(key, chunk.flat_start, count):
        block = out[offset : offset + z.size]
        np.less(z, limit, out=block, casting="unsafe")
        np.negative(block, out=block)
    return torch.from_numpy(out).reshape(like.shape)


def chunk_bernoulli(key: int, like: Tensor, chunk: ChunkInfo, p: float) -> Tensor:
    """Where the chunk's uniforms are < p, compared as integers: u < p ⟺ bits < ⌈p·2⁵³⌉ (p·2⁵³ is exact)."""
    return bernoulli_mask(key, like, chunk, p) != 0


# ---------------------------------------------------------------------------------------------
# Exact top-k over row chunks (radix select on float32 bit patterns)

_BINS = 1 << 16


def magnitude_key(x: Tensor) -> Tensor:
    """|x| as float32 bit patterns in int32: for non-negative floats the bit order is the value order.
    float64 magnitudes are rounded to float32 first (a monotone map: order is kept, near-equal values tie)."""
    return float_key(x.abs())


def float_key(x: Tensor) -> Tensor:
    """Bit patterns of a non-negative tensor, as ``magnitude_key`` (for keys that are already ≥ 0)."""
    return x.to(torch.float32).contiguous().view(torch.int32)


def _histogram(values: Tensor, bins: int = _BINS) -> np.ndarray:
    """Counts of each value in [0, bins), as int64 on the CPU. For large chunks torch's bincount, which
    releases the GIL (numpy's does not), so concurrent updates count in parallel; for small ones numpy's,
    as torch zero-fills its output with several threads when it may, which costs more than the counting."""
    flat = values.reshape(-1)
    if flat.device.type != "cpu":
        return torch.bincount(flat.long(), minlength=bins).cpu().numpy()
    if flat.numel() < bins:
        return np.bincount(flat.numpy(), minlength=bins).astype(np.int64, copy=False)
    return torch.bincount(flat, minlength=bins).numpy()


def _top_bin(hist: np.ndarray, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest of a histogram, and how many lie in higher bins."""
    at_or_above = hist[::-1].cumsum()[::-1]
    b = int(np.flatnonzero(at_or_above >= k).max())
    return b, int(at_or_above[b] - hist[b])


@dataclass
class _Query:
    k: int
    high: int = 0  # high 16 bits of the threshold
    need: int = 0  # how many of the k lie in the threshold's high bin
    threshold: int = 0  # bit pattern of the k-th largest key
    ties_allowed: int = 0  # how many keys equal to the threshold are kept
    ties_total: int = 0  # how many keys equal the threshold
    hist_low: np.ndarray = field(default_factory=lambda: np.zeros(_BINS, dtype=np.int64))


class TopK:
    """The k largest keys of a tensor seen in whole-row chunks, for one or more k at once.

    Pass "high": histogram of the high 16 bits; pass "low": histogram of the low 16 bits inside the
    bin holding the k-th largest, giving the exact k-th largest key T. Keys > T are kept; of the keys
    equal to T, those with the lowest flat indices are kept, so exactly k survive. Only when some k
    keeps part of the keys equal to its T (``needs_ties``) is a third pass made: ``count_ties`` records
    each row's count of keys equal to T, and ``settle_ties`` turns them into counts before each row.

    Every counting call may run concurrently with the others of its pass, for chunks in any order;
    the ``settle_*`` calls run after the pass. ``masks`` only reads, so merge workers may share one TopK.
    """

    def __init__(self, n: int, rows: int, ks: Sequence[int]) -> None:
        self.n = n
        self.rows = rows
        self.hist_high = np.zeros(_BINS, dtype=np.int64)
        self._lock = threading.Lock()
        self.choose(ks)

    def _selecting(self) -> list[tuple[int, _Query]]:
        return [(i, q) for i, q in enumerate(self.queries) if 0 < q.k < self.n]

    def _partial(self, q: _Query) -> bool:
        return 0 < q.k < self.n and q.ties_allowed != q.ties_total

    def choose(self, ks: Sequence[int]) -> None:
        """Set the k to select (before ``settle_high``) when they depend on the first pass."""
        self.queries = [_Query(min(max(k, 0), self.n)) for k in ks]
        self.row_ties = torch.zeros(len(self.queries), self.rows, dtype=torch.int64)
        self.ties_before: Tensor | None = None  # [query, row]: keys equal to T in earlier rows
        self._low_settled = False

    def count_high(self, keys: Tensor) -> None:
        if self.queries and not self._selecting():  # queries not chosen yet: they will be from this pass
            return
        counts = _histogram(keys >> 16)
        with self._lock:
            self.hist_high += counts

    def settle_high(self) -> None:
        for _, q in self._selecting():
            q.high, above_bin = _top_bin(self.hist_high, q.k)
            q.need = q.k - above_bin

    def count_low(self, keys: Tensor) -> None:
        flat = keys.reshape(-1)
        counts: dict[int, np.ndarray] = {}
        for _, q in self._selecting():
            if q.high not in counts:
                # A masked histogram instead of gathering the bin's keys: keys of the bin map to
                # 1..65536, those below to 0 and those above to 65537 (bins then dropped).
                shifted = (flat - ((q.high << 16) - 1)).clamp_(0, _BINS + 1)
                counts[q.high] = _histogram(shifted, _BINS + 2)[1 : _BINS + 1]
        with self._lock:
            for _, q in self._selecting():
                q.hist_low += counts[q.high]

    def settle_low(self) -> None:
        for _, q in self._selecting():
            low, above_bin = _top_bin(q.hist_low, q.need)
            q.threshold = (q.high << 16) | low
            q.ties_allowed = q.need - above_bin
            q.ties_total = int(q.hist_low[low])
        self._low_settled = True

    @property
    def needs_ties(self) -> bool:
        """Whether some k keeps only part of the keys equal to its threshold (known after ``settle_low``)."""
        return any(self._partial(q) for q in self.queries)

    def wants(self, phase: str) -> bool:
        """Whether pass ``phase`` ("high", "low", "ties") is still needed, given the passes settled so far."""
        if phase == "high":
            return not self.queries or bool(self._selecting())
        if phase == "low":
            return bool(self._selecting())
        if phase == "ties":
            return bool(self._selecting()) and (not self._low_settled or self.needs_ties)
        return False

    def count_ties(self, keys: Tensor, row_start: int, rows: int) -> None:
        """Record the chunk's per-row counts of keys equal to each threshold (disjoint rows: no lock)."""
        by_row = keys.reshape(rows, -1)
        for i, q in enumerate(self.queries):
            if self._partial(q):
                self.row_ties[i, row_start : row_start + rows] = (by_row == q.threshold).sum(1).cpu()

    def settle_ties(self) -> None:
        before = torch.zeros(len(self.queries), self.rows, dtype=torch.int64)
        before[:, 1:] = torch.cumsum(self.row_ties, 1)[:, :-1]
        self.ties_before = before

    def masks(self, keys: Tensor, row_start: int, rows: int) -> list[Tensor | None]:
        """Per k, the mask (int32) of the chunk's keys among the k largest; ``None``: all of them."""
        return [self._mask(i, q, keys, row_start, rows) for i, q in enumerate(self.queries)]

    def keep(self, keys: Tensor, row_start: int, rows: int, *, record: bool = False) -> list[Tensor]:
        """Per k, where (boolean) the chunk's keys are among the k largest. ``record`` counts the chunk's
        ties first: called so for the chunks in row order, without ``settle_ties``, it selects as it goes."""
        if record:
            self.count_ties(keys, row_start, rows)
        return [
            torch.ones_like(keys, dtype=torch.bool) if m is None else m != 0 for m in self.masks(keys, row_start, rows)
        ]

    def _mask(self, i: int, q: _Query, keys: Tensor, row_start: int, rows: int) -> Tensor | None:
        if q.k == 0:
            return torch.zeros_like(keys, dtype=torch.int32)
        if q.k == self.n:
            return None
        if not self._partial(q):  # every key equal to T is kept
            return above(keys, q.threshold - 1)
        ties = self.row_ties[i, row_start : row_start + rows]
        if self.ties_before is not None:
            before = self.ties_before[i, row_start : row_start + rows]
        else:  # rows recorded in order so far: count the earlier ones now
            before = self.row_ties[i, :row_start].sum() + torch.cumsum(ties, 0) - ties
        # Ties kept per row: all of them before the allowance runs out, none after, part in one row.
        allowed = torch.minimum((q.ties_allowed - before).clamp_(min=0), ties)
        thresholds = torch.where(allowed == ties, q.threshold - 1, q.threshold).to(keys.device, torch.int32)
        by_row = keys.reshape(rows, -1)
        mask = above(by_row, thresholds.unsqueeze(1))
        for r in torch.nonzero((allowed > 0) & (allowed < ties)).reshape(-1).tolist():
            tie = by_row[r] == q.threshold
            count = tie.long()
            rank = torch.cumsum(count, 0) - count  # ties before each, in flat order
            mask[r] |= (tie & (rank < int(allowed[r]))).to(torch.int32).neg_()
        return mask.reshape(keys.shape)


# ---------------------------------------------------------------------------------------------
# TIES sign election


def sign_agreement(deltas: Sequence[Tensor]) -> list[Tensor]:
    """TIES sign election by mass (mergekit's "sum" consensus): the elected sign is + where Σᵢ δᵢ ≥ 0,
    else −. The sum is taken in float64 so no rounding of the running sum can flip the vote. Returns,
    per input, where its sign equals the elected one; zeros never agree."""
    total = deltas[0].to(torch.float64)
    for d in deltas[1:]:
        total = total + d.to(torch.float64)
    positive = total >= 0
    return [torch.where(positive, d > 0, d < 0) for d in deltas]


def agreement_masks(deltas: Sequence[Tensor]) -> list[Tensor] | None:
    """``sign_agreement`` as int32 masks, for float32 deltas whose vote is finite everywhere; ``None``
    otherwise (the caller then uses ``sign_agreement``).

    The vote's sign is that of ``sign_agreement``: for one or two deltas a float32 sum has the sign of
    the exact sum (rounding is monotone and a non-zero sum of two float32 values is at least the
    smallest subnormal); for more, the float64 sum is taken in the same order, and narrowing it to float32
    keeps its sign and whether it is zero (every partial sum is a multiple of 2⁻¹⁴⁹). A delta agrees
    where δ·(±1 of the elected sign) > 0: a sign-bit test once −0.0 is made +0.0."""
    if any(d.dtype != torch.float32 for d in deltas):
        return None
    if len(deltas) == 1:
        vote = deltas[0] + 0.0
    elif len(deltas) == 2:
        vote = deltas[0] + deltas[1]
    else:
        vote = accumulate_([deltas[0].to(torch.float64), *deltas[1:]]).to(torch.float32)
    if not math.isfinite(float(vote.sum(dtype=torch.float64))):  # NaN or ±inf somewhere: go the slow way
        return None
    sign = vote.add_(0.0).view(torch.int32)  # −0.0 → +0.0: a zero vote elects +
    sign.bitwise_and_(SIGN_BIT).bitwise_or_(ONE_BITS)  # ±1.0
    masks = []
    for d in deltas:
        oriented = torch.mul(d, sign.view(torch.float32)).add_(0.0)  # > 0 where d agrees; no −0.0 left
        masks.append(oriented.view(torch.int32).neg_().bitwise_right_shift_(31))  # no overflow: not −0.0's bits
    return masks


def agreeing_weight_sum(masks: Sequence[Tensor], weight: Sequence[float], *, zero_as_one: bool) -> Tensor:
    """Σᵢ wᵢ over the agreeing inputs per element, in float32, accumulated left to right as
    ``Σ agreeᵢ.float()·wᵢ`` (the zeros of the non-agreeing terms change no non-zero sum; the weights must
    be finite, as 0·inf is NaN there but 0 here). With
    ``zero_as_one`` a zero sum becomes 1.0. Overwrites ``masks``."""
    total = masks[0].bitwise_and_(float32_bits(weight[0])).view(torch.float32)
    for m, w in zip(masks[1:], weight[1:], strict=True):
        total.add_(m.bitwise_and_(float32_bits(w)).view(torch.float32))
    if zero_as_one:
        bits = total.add_(0.0).view(torch.int32)  # −0.0 → +0.0
        is_zero = (bits & ABS_BITS).sub_(1).bitwise_right_shift_(31)  # all ones where the sum is ±0
        bits.bitwise_or_(is_zero.bitwise_and_(ONE_BITS))
    return total


# ---------------------------------------------------------------------------------------------
# Gram matrices of whole tensors (one statistic pass)

VectorFn = Callable[[Tensor | None, Sequence[Tensor], Mapping[str, Any]], Sequence[Tensor]]


@dataclass
class GramState:
    rows: int
    partials: RowPartials  # room for every pair of up to n_models + 1 vectors
    count: int = 0  # vectors per chunk (set by the updates, all alike)


class GramStatistic:
    """Gᵢⱼ = ⟨vᵢ, vⱼ⟩ over the whole tensor, for vectors ``vectors(base, models, params)`` built from
    each chunk (e.g. task vectors). Per-row float64 dot products, combined once by a pairwise tree.
    On the CPU, float32 vectors go through the native kernel (``native_gram``: the same sums, one pass)
    unless ``native`` is False (the executor sets it from ``--no-native``).

    ``wanted(shape, params)`` says whether this tensor needs the Gram matrix at all (e.g. not when the
    method works row by row); when it does not, no pass is made and the result is ``None``."""

    passes = 1
    concurrent = True
    native = True

    def __init__(self, vectors: VectorFn, wanted: Callable[[tuple[int, ...], Mapping[str, Any]], bool] | None = None):
        self.vectors = vectors
        self.wanted = wanted

    def begin(self, shape: tuple[int, ...], n_models: int, params: Mapping[str, Any]) -> GramState:
        if self.wanted is not None and not self.wanted(shape, params):
            self.passes = 0
        rows = tensor_rows(shape)
        most = n_models + 1  # the vectors are the models, their offsets from the base, or both with the base
        return GramState(rows=rows, partials=RowPartials(most * (most + 1) // 2, rows))

    def update(
        self,
        state: GramState,
        pass_index: int,
        base: Tensor | None,
        models: list[Tensor],
        params: Mapping[str, Any],
        chunk: ChunkInfo,
    ) -> None:
        if pass_index >= self.passes:
            return
        vectors = [v.contiguous() for v in self.vectors(base, models, params)]
        state.count = len(vectors)
        rows = chunk_rows(chunk)
        if self.native and native_gram.supports(vectors):
            sums = native_gram.gram_rows(vectors, rows)
            for idx in range(sums.shape[0]):
                state.partials.put(idx, chunk.row_start, sums[idx])
            return
        wide = [v.to(torch.float64) for v in vectors]  # widened once, not per pair
        for idx, (i, j) in enumerate(_pairs(len(wide))):
            state.partials.put(idx, chunk.row_start, row_sums(wide[i] * wide[j], rows))

    def finish_pass(self, state: GramState, pass_index: int) -> None:
        pass

    def result(self, state: GramState) -> list[list[float]] | None:
        if state.count == 0:
            return None
        n = state.count
        gram = [[0.0] * n for _ in range(n)]
        for idx, (i, j) in enumerate(_pairs(n)):
            gram[i][j] = gram[j][i] = state.partials.total(idx)
        return gram


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i, n)]


def fiber_dot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a, b⟩ along the last dim in float64, keeping that dim (size 1): per-row statistics computed
    inside one chunk, identical for any chunking because each fiber is summed by the same tree."""
    product = a.to(torch.float64, copy=True)
    return pairwise_sum(product.mul_(b)).unsqueeze(-1)


def quad(c: Sequence[float], gram: Sequence[Sequence[float]]) -> float:
    """cᵀGc: the squared norm of Σ cᵢvᵢ from the Gram matrix (clamped at 0 against rounding)."""
    n = len(c)
    return max(0.0, math.fsum(c[i] * gram[i][j] * c[j] for i in range(n) for j in range(n)))


def matvec(gram: Sequence[Sequence[float]], c: Sequence[float]) -> list[float]:
    """Gc: the dot products ⟨vᵢ, Σ cⱼvⱼ⟩."""
    return [math.fsum(row[j] * c[j] for j in range(len(c))) for row in gram]
