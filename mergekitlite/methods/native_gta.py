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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mergekitlite.io.safetensors_header import itemsize
from mergekitlite.methods.native import load_extension
from mergekitlite.methods.registry import ChunkInfo

ABI_VERSION = 1  # must equal gta.c's
MAX_MODELS = 64
CODES = {"F32": 0, "BF16": 1, "F16": 2}  # safetensors dtype code -> dtypes.h's enum
MASK_ALL, MASK_NONE, MASK_TOPK, MASK_RANDOM = range(4)
_QUERY_KINDS = {"none": 0, "all": 1, "threshold": 2}
_BINS = 1 << 16


_KERNEL = load_extension("_gta", ABI_VERSION)
RECORD_SLOTS: int = getattr(_KERNEL, "RECORD_SLOTS", 0)  # distinct low halves per row the low pass records


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


def raw_buffer(buf: Any) -> tuple[int, int]:
    """(address, bytes) of a contiguous uint8 CPU buffer: a numpy array or a torch tensor. Anything else is
    refused: the kernels read and write raw memory."""
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or not buf.flags.c_contiguous:
            raise ValueError(f"native buffers must be contiguous uint8 arrays, not {buf.dtype}")
        return buf.ctypes.data, buf.nbytes
    if not isinstance(buf, Tensor) or buf.dtype != torch.uint8 or buf.device.type != "cpu" or not buf.is_contiguous():
        raise ValueError(f"native buffers must be contiguous uint8 CPU tensors, not {getattr(buf, 'dtype', buf)}")
    return buf.data_ptr(), buf.numel()


def _elements(raw: Sequence[Any], codes: Sequence[str]) -> tuple[int, list[int]]:
    """The values per input (all the same) and the inputs' addresses."""
    buffers = [raw_buffer(b) for b in raw]
    n = buffers[0][1] // itemsize(codes[0])
    for (_, nbytes), code in zip(buffers, codes, strict=True):
        if nbytes != n * itemsize(code):
            raise ValueError(f"native input of {nbytes} bytes for {n} {code} values")
    return n, [addr for addr, _ in buffers]


def _check_rows(n: int, chunk: ChunkInfo) -> None:
    """The kernels index per-row data by element // row length: the buffers must hold the chunk's rows."""
    if n != (chunk.row_end - chunk.row_start) * chunk.row_elements:
        raise ValueError(f"{n} values for a chunk of {chunk.row_end - chunk.row_start} rows of {chunk.row_elements}")


def _delta(addresses: Sequence[int], codes: Sequence[str], i: int) -> tuple[int, int, int, int]:
    return (addresses[0], CODES[codes[0]], addresses[i + 1], CODES[codes[i + 1]])


def _kernel() -> ModuleType:
    if _KERNEL is None:
        raise RuntimeError("the native GTA kernel is not built (reinstall mergekitlite with a C compiler)")
    return _KERNEL


def run_merge(
    raw: Sequence[Any],
    codes: Sequence[str],
    out: Any,
    out_code: str,
    chunk: ChunkInfo,
    specs: Sequence[tuple[Any, ...]],
    agree_weights: Sequence[float],
    *,
    consensus: bool,
    normalize_agreeing: bool,
    divisor: float | None,
    lambda_: float | None,
) -> tuple[tuple[int, ...], int, int] | None:
    """The merge of one chunk into ``out`` (raw buffers: contiguous uint8 numpy arrays or CPU tensors), and
    the NaN/±inf it met (``nonfinite.NonFinite.from_kernel``'s counts: per input read, written, and written
    but finite before the cast); ``None``: a TIES vote is not finite, run the torch path for this chunk."""
    out_addr, out_bytes = raw_buffer(out)
    n, addresses = _elements(raw, codes)
    _check_rows(n, chunk)
    if out_bytes != n * itemsize(out_code):
        raise ValueError(f"native output of {out_bytes} bytes for {n} {out_code} values")
    status, nonfinite_in, nonfinite_out, overflow = _kernel().merge(
        out_addr,
        CODES[out_code],
        n,
        chunk.row_elements,
        chunk.flat_start,
        addresses,
        [CODES[c] for c in codes],
        list(specs),
        [float(w) for w in agree_weights],
        int(consensus),
        int(normalize_agreeing),
        divisor,
        lambda_,
    )
    return (nonfinite_in, nonfinite_out, overflow) if status == 0 else None


def count_high(raw: Sequence[Any], codes: Sequence[str], i: int) -> np.ndarray | None:
    """Histogram (int64, 65536 bins) of model i's |δ| keys >> 16 over the chunk; ``None`` when some |δ| is
    NaN (NaN keys depend on payloads, which torch propagates its own way: leave the chunk to torch)."""
    n, addresses = _elements(raw, codes)
    hist = np.zeros(_BINS, dtype=np.int64)
    nan, _ = _kernel().counts(_delta(addresses, codes, i), n, 1, 0, [], [hist.ctypes.data])
    return None if nan else hist


def count_low(
    raw: Sequence[Any],
    codes: Sequence[str],
    i: int,
    highs: Sequence[int],
    rows: int = 1,
    records: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[dict[int, np.ndarray], bool] | None:
    """Per high bin h: histogram of the low 16 bits of model i's |δ| keys whose high 16 bits are h, and
    whether ``records`` overflowed; ``None`` when some |δ| is NaN. ``records`` (per h, optional): per chunk
    row, ``RECORD_SLOTS`` distinct low halves of the bin's keys (int32, −1: free) and their counts (int64),
    filled in as they come; overflowed: some row had more distinct ones than slots."""
    n, addresses = _elements(raw, codes)
    hists = {h: np.zeros(_BINS, dtype=np.int64) for h in highs}
    if not hists:
        return hists, False
    if rows < 1 or n % rows:
        raise ValueError(f"{n} values are not {rows} equal rows")
    tables = None
    if records is not None:
        tables = []
        for h in hists:
            lows, counts = records[h]
            if lows.dtype != np.int32 or counts.dtype != np.int64 or lows.size != rows * RECORD_SLOTS:
                raise ValueError("records must be int32 lows and int64 counts, RECORD_SLOTS per chunk row")
            if counts.size != lows.size or not (lows.flags.c_contiguous and counts.flags.c_contiguous):
                raise ValueError("records must be contiguous, as many counts as lows")
            tables.append((lows.ctypes.data, counts.ctypes.data))
    ptrs = [h.ctypes.data for h in hists.values()]
    nan, overflow = _kernel().counts(_delta(addresses, codes, i), n, n // rows, 1, list(hists), ptrs, tables)
    return None if nan else (hists, bool(overflow))


def count_ties(
    raw: Sequence[Any], codes: Sequence[str], i: int, rows: int, thresholds: Sequence[int]
) -> list[Tensor] | None:
    """Per threshold, the chunk's per-row counts (int64) of model i's |δ| keys equal to it; ``None`` when
    some |δ| is NaN."""
    n, addresses = _elements(raw, codes)
    if rows < 1 or n % rows:
        raise ValueError(f"{n} values are not {rows} equal rows")
    counts = [torch.zeros(rows, dtype=torch.int64) for _ in thresholds]
    if counts and n:
        ptrs = [c.data_ptr() for c in counts]
        nan, _ = _kernel().counts(_delta(addresses, codes, i), n, n // rows, 2, list(thresholds), ptrs)
        if nan:
            return None
    return counts


def row_l1(
    raw: Sequence[Any],
    codes: Sequence[str],
    i: int,
    chunk: ChunkInfo,
    mask: NativeMask,
    before: Tensor,
    after: Tensor,
) -> None:
    """Per chunk row: Σ|δᵢ| into ``before`` and Σ|δᵢ|·maskᵢ into ``after`` (float64, by pairwise_sum's tree)."""
    rows = chunk.row_end - chunk.row_start
    n, addresses = _elements(raw, codes)
    _check_rows(n, chunk)
    for t in (before, after):
        if t.dtype != torch.float64 or not t.is_contiguous() or t.numel() != rows:
            raise ValueError("row sums must be a contiguous float64 tensor, one per chunk row")
    _kernel().row_l1(
        _delta(addresses, codes, i),
        rows,
        chunk.row_elements,
        chunk.flat_start,
        mask.spec(None, None),
        before.data_ptr(),
        after.data_ptr(),
    )


def finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(float(v)) for v in values)
