"""The native kernels of the sparsified task-arithmetic family (``mergekitlite/kernels/gta.c``), when built.

The merge pass and the statistic passes of TIES, DARE and Breadcrumbs (and their linear/TIES variants),
from the inputs' raw bytes (bf16, fp16 or float32) to the output's raw bytes, with the float32 operations
of ``sparsify``'s torch path in the same order: the same bits, without the ~15 passes over memory and the
numpy hashing of the torch path. What the kernel cannot reproduce bit for bit it declines: a sparsifier
without a kernel mask (DELLA), non-finite TIES weights (per task), a non-finite TIES vote (per chunk: the
kernel detects it and the caller runs the torch path for that chunk).

The module only knows how to call the kernel: the masks are described by the sparsifiers
(``NativeMask``), the statistics fold the counts in (``sparsify.SparseStatistic.update_raw``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mergekitlite.io.safetensors_header import itemsize
from mergekitlite.methods.registry import ChunkInfo

ABI_VERSION = 1  # must equal gta.c's
MAX_MODELS = 64
CODES = {"F32": 0, "BF16": 1, "F16": 2}  # safetensors dtype code -> dtypes.h's enum
MASK_ALL, MASK_NONE, MASK_TOPK, MASK_RANDOM = range(4)
_QUERY_KINDS = {"none": 0, "all": 1, "threshold": 2}
_BINS = 1 << 16


def _load() -> ModuleType | None:
    try:
        from mergekitlite import _gta  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _gta if getattr(_gta, "ABI_VERSION", None) == ABI_VERSION else None


_KERNEL = _load()


def available() -> bool:
    return _KERNEL is not None


def supports(in_codes: Sequence[str], out_code: str | None = None) -> bool:
    """Whether the kernel takes these safetensors dtype codes (the base first, then up to 64 models)."""
    return (
        available()
        and 2 <= len(in_codes) <= MAX_MODELS + 1
        and all(c in CODES for c in in_codes)
        and (out_code is None or out_code in CODES)
    )


@dataclass(frozen=True)
class NativeMask:
    """One model's mask over a chunk, as the kernel computes it: ``MASK_ALL``/``MASK_NONE``; ``MASK_TOPK``
    with up to two top-k rules (``TopK.mask_rules``) keeping what the first keeps and the second does not;
    ``MASK_RANDOM``: splitmix64(key + i·γ) < limit (i: the element's flat index in the tensor)."""

    kind: int
    rules: tuple[tuple[str, int, tuple[Tensor, Tensor] | None], ...] = ()
    key: int = 0
    limit: int = 0

    def spec(self, scale: float | None, weight: float | None) -> tuple[Any, ...]:
        rules = [*self.rules, ("none", 0, None), ("none", 0, None)][:2]
        queries = [
            (_QUERY_KINDS[kind], threshold, *((0, 0) if rows is None else (rows[0].data_ptr(), rows[1].data_ptr())))
            for kind, threshold, rows in rules
        ]
        return (self.kind, *queries, self.key, self.limit, scale, weight)


KEEP_ALL = NativeMask(MASK_ALL)


def _check(raw: Sequence[Tensor], codes: Sequence[str], n: int) -> None:
    for t, code in zip(raw, codes, strict=True):
        if t.numel() != n * itemsize(code) or t.dtype != torch.uint8 or t.device.type != "cpu":
            raise ValueError(f"native input of {t.numel()} {t.dtype} bytes on {t.device} for {n} {code} values")
        if not t.is_contiguous():
            raise ValueError("native inputs must be contiguous")


def _delta(raw: Sequence[Tensor], codes: Sequence[str], i: int) -> tuple[int, int, int, int]:
    return (raw[0].data_ptr(), CODES[codes[0]], raw[i + 1].data_ptr(), CODES[codes[i + 1]])


def _kernel() -> ModuleType:
    if _KERNEL is None:
        raise RuntimeError("the native GTA kernel is not built (reinstall mergekitlite with a C compiler)")
    return _KERNEL


def run_merge(
    raw: Sequence[Tensor],
    codes: Sequence[str],
    out: Tensor,
    out_code: str,
    chunk: ChunkInfo,
    specs: Sequence[tuple[Any, ...]],
    agree_weights: Sequence[float],
    *,
    consensus: bool,
    normalize_agreeing: bool,
    divisor: float | None,
    lambda_: float | None,
) -> tuple[bool, int, int]:
    """The merge of one chunk into ``out`` (contiguous uint8): (done, non-finite input values, non-finite
    output values). ``done`` False: a TIES vote is not finite, run the torch path for this chunk instead."""
    if not out.is_contiguous() or out.dtype != torch.uint8 or out.device.type != "cpu":
        raise ValueError("the native output must be a contiguous uint8 CPU tensor")
    n = out.numel() // itemsize(out_code)
    _check(raw, codes, n)
    status, nonfinite_in, nonfinite_out = _kernel().merge(
        out.data_ptr(),
        CODES[out_code],
        n,
        chunk.row_elements,
        chunk.flat_start,
        [t.data_ptr() for t in raw],
        [CODES[c] for c in codes],
        list(specs),
        [float(w) for w in agree_weights],
        int(consensus),
        int(normalize_agreeing),
        divisor,
        lambda_,
    )
    return status == 0, nonfinite_in, nonfinite_out


def count_high(raw: Sequence[Tensor], codes: Sequence[str], i: int) -> np.ndarray | None:
    """Histogram (int64, 65536 bins) of model i's |δ| keys >> 16 over the chunk; ``None`` when some |δ| is
    NaN (NaN keys depend on payloads, which torch propagates its own way: leave the chunk to torch)."""
    n = raw[0].numel() // itemsize(codes[0])
    _check(raw, codes, n)
    hist = np.zeros(_BINS, dtype=np.int64)
    nan = _kernel().counts(_delta(raw, codes, i), n, 1, 0, [], [hist.ctypes.data])
    return None if nan else hist


def count_low(
    raw: Sequence[Tensor], codes: Sequence[str], i: int, highs: Sequence[int]
) -> dict[int, np.ndarray] | None:
    """Per high bin h: histogram of the low 16 bits of model i's |δ| keys whose high 16 bits are h;
    ``None`` when some |δ| is NaN."""
    n = raw[0].numel() // itemsize(codes[0])
    _check(raw, codes, n)
    hists = {h: np.zeros(_BINS, dtype=np.int64) for h in highs}
    if not hists:
        return hists
    nan = _kernel().counts(_delta(raw, codes, i), n, 1, 1, list(hists), [h.ctypes.data for h in hists.values()])
    return None if nan else hists


def count_ties(
    raw: Sequence[Tensor], codes: Sequence[str], i: int, rows: int, thresholds: Sequence[int]
) -> list[Tensor] | None:
    """Per threshold, the chunk's per-row counts (int64) of model i's |δ| keys equal to it; ``None`` when
    some |δ| is NaN."""
    n = raw[0].numel() // itemsize(codes[0])
    _check(raw, codes, n)
    counts = [torch.zeros(rows, dtype=torch.int64) for _ in thresholds]
    if counts and n:
        ptrs = [c.data_ptr() for c in counts]
        if _kernel().counts(_delta(raw, codes, i), n, n // rows, 2, list(thresholds), ptrs):
            return None
    return counts


def row_l1(
    raw: Sequence[Tensor],
    codes: Sequence[str],
    i: int,
    chunk: ChunkInfo,
    mask: NativeMask,
    before: Tensor,
    after: Tensor,
) -> None:
    """Per chunk row: Σ|δᵢ| into ``before`` and Σ|δᵢ|·maskᵢ into ``after`` (float64, by pairwise_sum's tree)."""
    rows = chunk.row_end - chunk.row_start
    n = raw[0].numel() // itemsize(codes[0])
    _check(raw, codes, n)
    for t in (before, after):
        if t.dtype != torch.float64 or not t.is_contiguous() or t.numel() != rows:
            raise ValueError("row sums must be a contiguous float64 tensor, one per chunk row")
    _kernel().row_l1(
        _delta(raw, codes, i),
        rows,
        chunk.row_elements,
        chunk.flat_start,
        mask.spec(None, None),
        before.data_ptr(),
        after.data_ptr(),
    )


def finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(float(v)) for v in values)
