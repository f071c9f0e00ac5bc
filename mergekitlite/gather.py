"""Reading the rows of an input whose rows are gathered (``taskgraph.RowSource``): runs of consecutive rows of
one tensor are read with one positioned read each, single rows set to zero or to a mean are computed in
float64 and cast once to the input's dtype. The bytes that come out are those of the input's own dtype,
so everything downstream (statistics, methods, the native kernel) sees an ordinary input."""

from __future__ import annotations

import numpy as np
import torch

from mergekitlite.io.files import InputFiles
from mergekitlite.io.safetensors_header import itemsize, torch_dtype
from mergekitlite.lora.rows import read_rows
from mergekitlite.rounding import narrow_once
from mergekitlite.taskgraph import InputRef, RowSource

# Rows of the padding mean are summed this many at a time (bounded memory for any vocabulary).
_PAD_BLOCK_ROWS = 4096


def _view(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _read_plain(files: InputFiles, ref: InputRef, first: int, rows: int, dst: memoryview) -> None:
    read_rows(files, ref.tensor, first, rows, dst)  # as stored, or computed for a model+adapter input


def _row_values(files: InputFiles, ref: InputRef, row: int) -> torch.Tensor:
    """One row of ``ref`` as float64."""
    raw = torch.empty(ref.tensor.row_bytes, dtype=torch.uint8)
    _read_plain(files, ref, row, 1, _view(raw))
    return raw.view(torch_dtype(ref.tensor.dtype)).to(torch.float64)


def _pair(src: RowSource, pair: tuple[int, int]) -> tuple[InputRef, int]:
    return src.refs[pair[0]], pair[1]


def _put(values: torch.Tensor, own: InputRef, dst: memoryview) -> None:
    """Cast float64 ``values`` once to the input's dtype and write their bytes."""
    out = narrow_once(values, torch_dtype(own.tensor.dtype)).contiguous()
    dst[:] = _view(out.reshape(-1))


def _pad_mean(files: InputFiles, src: RowSource) -> torch.Tensor:
    """The float64 mean of the input's gathered real rows (what mergekit pads a vocabulary with)."""
    own = src.refs[0]
    rb = own.tensor.row_bytes
    total = torch.zeros(rb // itemsize(own.tensor.dtype), dtype=torch.float64)
    buf = torch.empty(_PAD_BLOCK_ROWS * rb, dtype=torch.uint8)
    for start in range(0, src.real_rows, _PAD_BLOCK_ROWS):
        n = min(_PAD_BLOCK_ROWS, src.real_rows - start)
        gather_rows(files, src, start, n, _view(buf)[: n * rb])
        block = buf[: n * rb].view(torch_dtype(own.tensor.dtype)).view(n, -1)
        total += block.to(torch.float64).sum(dim=0)
    return total / max(1, src.real_rows)


def gather_rows(files: InputFiles, src: RowSource, first: int, rows: int, dst: memoryview) -> None:
    """Rows ``first .. first + rows − 1`` of the gathered input, as bytes of its own dtype, into ``dst``."""
    own = src.refs[0]
    rb = own.tensor.row_bytes
    index = np.asarray(src.index[first : first + rows], dtype=np.int64)
    row = np.asarray(src.row[first : first + rows], dtype=np.int64)
    if rows == 0:
        return
    # A run: rows of one tensor whose source rows follow each other.
    breaks = np.flatnonzero((index[1:] != index[:-1]) | (row[1:] != row[:-1] + 1) | (index[1:] < 0)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [rows]))
    pad: torch.Tensor | None = None
    for a, b in zip(starts.tolist(), ends.tolist()):
        k = int(index[a])
        part = dst[a * rb : b * rb]
        if k >= 0:
            ref = src.refs[k]
            if ref.tensor.dtype == own.tensor.dtype:
                _read_plain(files, ref, int(row[a]), b - a, part)
            else:  # another model's rows in another dtype: cast once
                raw = torch.empty((b - a) * ref.tensor.row_bytes, dtype=torch.uint8)
                _read_plain(files, ref, int(row[a]), b - a, _view(raw))
                _put(raw.view(torch_dtype(ref.tensor.dtype)).to(torch.float64), own, part)
        elif k == RowSource.ZERO:
            part[:] = bytes(len(part))
        elif k == RowSource.MEAN:
            pairs = src.means[first + a]
            total = _row_values(files, *_pair(src, pairs[0]))
            for pair in pairs[1:]:
                total += _row_values(files, *_pair(src, pair))
            _put(total / len(pairs), own, part)
        elif k == RowSource.PAD:
            if pad is None:
                pad = _pad_mean(files, src)
            _put(pad.repeat(b - a), own, part)
        else:  # pragma: no cover - the planner makes only the kinds above
            raise ValueError(f"unknown row source {k}")
