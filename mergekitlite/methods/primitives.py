"""Building blocks shared by the merge methods, each written once.

Everything here gives bit-identical results however a tensor is cut into row chunks, and the same
bits on CPU and GPU:

* reductions are float64 additions in a fixed pairwise tree that depends only on the length summed
  (torch's own ``sum`` picks its blocking and threading from the tensor's size, so a row summed
  inside a 1-row chunk and inside a 100-row chunk could round differently);
* exact top-k selection uses integer histograms of float32 bit patterns (radix select), never a sort;
* random numbers are a pure function of (seed, stream, flat element index): a splitmix64 counter hash
  in int64 torch ops, never a stateful generator.

Transcendental functions (acos, sin...) are only ever applied to Python floats or to one fixed array
per tensor, because torch's vectorised kernels may round the tail of a tensor differently from its body.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mergekitlite.methods.registry import ChunkInfo

# ---------------------------------------------------------------------------------------------
# Exact, chunk-independent reductions


def pairwise_sum(x: Tensor) -> Tensor:
    """Σ over the last dim in float64, by a fixed pairwise tree: pad with zeros to a power of two,
    then add the two halves until one element is left. The tree depends only on the length summed."""
    x = x.to(torch.float64)
    n = x.shape[-1]
    if n == 0:
        return x.new_zeros(x.shape[:-1])
    size = 1 << (n - 1).bit_length()
    if size != n:
        x = F.pad(x, (0, size - n))  # adding +0.0 is exact, so padding changes no sum
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def chunk_rows(chunk: ChunkInfo) -> int:
    """Rows in the chunk (a scalar tensor is one row)."""
    return chunk.row_end - chunk.row_start


def row_sums(x: Tensor, rows: int) -> Tensor:
    """Per-row float64 sums of a chunk holding ``rows`` whole rows, on the CPU."""
    return pairwise_sum(x.reshape(rows, -1)).cpu()


def row_dots(a: Tensor, b: Tensor, rows: int) -> Tensor:
    """Per-row ⟨a, b⟩ in float64 (the products of float32 values are exact in float64)."""
    return row_sums(a.to(torch.float64) * b.to(torch.float64), rows)


class RowPartials:
    """Per-row float64 partial results of ``count`` quantities, filled chunk by chunk and combined once."""

    def __init__(self, count: int, rows: int) -> None:
        self.values = torch.zeros(count, rows, dtype=torch.float64)

    def put(self, index: int, row_start: int, sums: Tensor) -> None:
        self.values[index, row_start : row_start + sums.numel()] = sums

    def total(self, index: int) -> float:
        return float(pairwise_sum(self.values[index]))


def divide_(x: Tensor, divisor: float) -> Tensor:
    """x /= divisor in place, correctly rounded on every device. CUDA turns division by a Python scalar
    into multiplication by its reciprocal (two roundings); a divisor on the tensor's device is divided."""
    return x.div_(torch.tensor(divisor, dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers (splitmix64)

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


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


def random_bits(key: int, flat_start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """53 random bits (int64 in [0, 2⁵³)) for flat indices ``flat_start ..``: element i gets the top 53 bits
    of splitmix64(key + i·γ). int64 products wrap mod 2⁶⁴, as the hash needs."""
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


def chunk_bernoulli(key: int, like: Tensor, chunk: ChunkInfo, p: float) -> Tensor:
    """Where the chunk's uniforms are < p, compared as integers: u < p ⟺ bits < ⌈p·2⁵³⌉ (p·2⁵³ is exact)."""
    bits = random_bits(key, chunk.flat_start, like.numel(), like.device).reshape(like.shape)
    return bits < math.ceil(min(max(p, 0.0), 1.0) * 2.0**53)


# ---------------------------------------------------------------------------------------------
# Exact top-k over row chunks (radix select on float32 bit patterns)

_BINS = 1 << 16


def magnitude_key(x: Tensor) -> Tensor:
    """|x| as float32 bit patterns in int32: for non-negative floats the bit order is the value order.
    float64 magnitudes are rounded to float32 first (a monotone map: order is kept, near-equal values tie)."""
    return x.abs().to(torch.float32).contiguous().view(torch.int32)


def float_key(x: Tensor) -> Tensor:
    """Bit patterns of a non-negative tensor, as ``magnitude_key`` (for keys that are already ≥ 0)."""
    return x.to(torch.float32).contiguous().view(torch.int32)


def _histogram(values: Tensor) -> np.ndarray:
    """Counts of each 16-bit value, as int64 on the CPU (numpy: single-threaded, cheap for small chunks)."""
    if values.device.type != "cpu":
        return torch.bincount(values.reshape(-1).long(), minlength=_BINS).cpu().numpy()
    return np.bincount(values.reshape(-1).numpy(), minlength=_BINS).astype(np.int64)


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
    equal to T, those with the lowest flat indices are kept, so exactly k survive. That tie rule needs
    per-row counts of keys equal to T, taken in a third pass that must see the rows in order.
    """

    def __init__(self, n: int, rows: int, ks: Sequence[int]) -> None:
        self.n = n
        self.queries = [_Query(min(max(k, 0), n)) for k in ks]
        self.hist_high = np.zeros(_BINS, dtype=np.int64)
        self.row_ties = torch.zeros(len(ks), rows, dtype=torch.int64)

    def _selecting(self) -> list[tuple[int, _Query]]:
        return [(i, q) for i, q in enumerate(self.queries) if 0 < q.k < self.n]

    def choose(self, ks: Sequence[int]) -> None:
        """Set the k to select (before ``settle_high``) when they depend on the first pass."""
        self.queries = [_Query(min(max(k, 0), self.n)) for k in ks]
        self.row_ties = torch.zeros(len(ks), self.row_ties.shape[1], dtype=torch.int64)

    def count_high(self, keys: Tensor) -> None:
        if not self.queries or self._selecting():  # no queries yet: they will be chosen from this pass
            self.hist_high += _histogram(keys >> 16)

    def settle_high(self) -> None:
        for _, q in self._selecting():
            q.high, above = _top_bin(self.hist_high, q.k)
            q.need = q.k - above

    def count_low(self, keys: Tensor) -> None:
        flat = keys.reshape(-1)
        for _, q in self._selecting():
            low = flat[(flat >> 16) == q.high] & 0xFFFF
            q.hist_low += _histogram(low)

    def settle_low(self) -> None:
        for _, q in self._selecting():
            low, above = _top_bin(q.hist_low, q.need)
            q.threshold = (q.high << 16) | low
            q.ties_allowed = q.need - above
            q.ties_total = int(q.hist_low[low])

    def keep(self, keys: Tensor, row_start: int, rows: int, *, record: bool = False) -> list[Tensor]:
        """Per k, where the chunk's keys are among the k largest. ``record`` (third pass) stores the
        chunk's per-row tie counts; later chunks and the merge pass read the counts of earlier rows."""
        return [self._keep_one(i, q, keys, row_start, rows, record) for i, q in enumerate(self.queries)]

    def _keep_one(self, i: int, q: _Query, keys: Tensor, row_start: int, rows: int, record: bool) -> Tensor:
        if q.k == 0:
            return torch.zeros_like(keys, dtype=torch.bool)
        if q.k == self.n:
            return torch.ones_like(keys, dtype=torch.bool)
        if q.ties_allowed == q.ties_total:  # no partial tie: every key equal to T is kept
            return keys >= q.threshold
        tie = keys == q.threshold
        if record:
            self.row_ties[i, row_start : row_start + rows] = tie.reshape(rows, -1).sum(1).cpu()
        before = int(self.row_ties[i, :row_start].sum())
        here = int(self.row_ties[i, row_start : row_start + rows].sum())
        if before + here <= q.ties_allowed:
            return keys >= q.threshold
        keep = keys > q.threshold
        if before < q.ties_allowed:  # the chunk where the allowance runs out: count its ties in flat order
            flat = tie.reshape(-1).long()
            rank = torch.cumsum(flat, 0) - flat
            keep |= tie & (rank + before < q.ties_allowed).reshape(tie.shape)
        return keep


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


# ---------------------------------------------------------------------------------------------
# Gram matrices of whole tensors (one statistic pass)

VectorFn = Callable[[Tensor | None, Sequence[Tensor], Mapping[str, Any]], Sequence[Tensor]]


@dataclass
class GramState:
    rows: int
    partials: RowPartials | None = None
    count: int = 0


class GramStatistic:
    """Gᵢⱼ = ⟨vᵢ, vⱼ⟩ over the whole tensor, for vectors ``vectors(base, models, params)`` built from
    each chunk (e.g. task vectors). Per-row float64 dot products, combined once by a pairwise tree.

    ``wanted(shape, params)`` says whether this tensor needs the Gram matrix at all (e.g. not when the
    method works row by row); when it does not, no pass is made and the result is ``None``."""

    passes = 1

    def __init__(self, vectors: VectorFn, wanted: Callable[[tuple[int, ...], Mapping[str, Any]], bool] | None = None):
        self.vectors = vectors
        self.wanted = wanted

    def begin(self, shape: tuple[int, ...], n_models: int, params: Mapping[str, Any]) -> GramState:
        if self.wanted is not None and not self.wanted(shape, params):
            self.passes = 0
        return GramState(rows=shape[0] if shape else 1)

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
        vs = self.vectors(base, models, params)
        if state.partials is None:
            state.count = len(vs)
            state.partials = RowPartials(len(vs) * (len(vs) + 1) // 2, state.rows)
        rows = chunk_rows(chunk)
        for idx, (i, j) in enumerate(_pairs(state.count)):
            state.partials.put(idx, chunk.row_start, row_dots(vs[i], vs[j], rows))

    def finish_pass(self, state: GramState, pass_index: int) -> None:
        pass

    def result(self, state: GramState) -> list[list[float]] | None:
        if state.partials is None:
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
    return pairwise_sum(a.to(torch.float64) * b.to(torch.float64)).unsqueeze(-1)


def quad(c: Sequence[float], gram: Sequence[Sequence[float]]) -> float:
    """cᵀGc: the squared norm of Σ cᵢvᵢ from the Gram matrix (clamped at 0 against rounding)."""
    n = len(c)
    return max(0.0, math.fsum(c[i] * gram[i][j] * c[j] for i in range(n) for j in range(n)))


def matvec(gram: Sequence[Sequence[float]], c: Sequence[float]) -> list[float]:
    """Gc: the dot products ⟨vᵢ, Σ cⱼvⱼ⟩."""
    return [math.fsum(row[j] * c[j] for j in range(len(c))) for row in gram]


def combine(vectors: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
    """Σ cᵢ·vᵢ in the vectors' dtype, accumulated left to right."""
    total = vectors[0] * coefficients[0]
    for v, c in zip(vectors[1:], coefficients[1:], strict=True):
        total.add_(v * c)
    return total
