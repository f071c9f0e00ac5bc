"""The rows of an adapted tensor, produced on read: for rows [first, first + n) of W,

    out = W[rows] (as float32) + s · Σₖ L[rows, k] · R[k, :]      for each LoRA factor, in the adapter's order

with L the row factor (B's rows; Aᵀ's rows for embeddings and Conv1D) and R the whole factor (A; Bᵀ). The sum
over the rank runs k = 0, 1, … r−1 as separate float32 multiplies and adds (no BLAS, no fused multiply-add),
so each element's value depends only on its own row and column: the result is bitwise the same whatever the
chunking, and the same on any machine with IEEE float32. It is computed on the host by the reading worker,
whatever ``--device`` the merge computes on. Then s multiplies the sum and W is added, as peft's
``W + (B @ A) * scaling`` associates.

Working space per chunk (counted by the planner, see ``AdaptedTensor.extra_row_bytes`` / ``fixed_bytes``):
the stored W rows, an accumulator and a product buffer (float32, rows × cols each), the row factor
(rows × r) and the whole factor (r × cols, float32 and as stored).
"""

from __future__ import annotations

from typing import Protocol

import torch

from mergekitlite.io.files import InputFiles
from mergekitlite.io.safetensors_header import TensorInfo, itemsize, torch_dtype
from mergekitlite.lora.tensor import BIAS, LINEAR, AdaptedTensor, LoraFactor

_CPU = torch.device("cpu")


class Buffers(Protocol):
    """Reusable per-worker buffers (execute.ChunkBuffers)."""

    def get(self, slot: str, index: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor: ...


def _buffer(bufs: Buffers | None, slot: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    if bufs is None:
        return torch.empty(numel, dtype=dtype)
    return bufs.get("lora-" + slot, 0, numel, dtype, _CPU)


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _read(files: InputFiles, info: TensorInfo, start_elem: int, count: int, out: torch.Tensor) -> torch.Tensor:
    """Elements [start, start + count) of ``info`` (row-major) as stored, into the uint8 buffer ``out``."""
    size = itemsize(info.dtype)
    raw = out[: count * size]
    files.read_into(info, start_elem * size, _bytes(raw))
    return raw.view(torch_dtype(info.dtype))


def read_rows(
    files: InputFiles, info: TensorInfo, first: int, rows: int, dst: memoryview, bufs: Buffers | None = None
) -> None:
    """Rows ``first .. first + rows − 1`` of ``info`` as bytes of its dtype into ``dst``: read as stored, or,
    for an adapted tensor with LoRA factors, computed (see the module docstring)."""
    if not (isinstance(info, AdaptedTensor) and info.computed):
        files.read_into(info, first * info.row_bytes, dst)
        return
    assert info.base is not None
    cols = info.numel // info.shape[0] if info.shape and info.shape[0] else 1
    out = torch.frombuffer(dst, dtype=torch.float32).view(rows, cols)
    w = _read(files, info.base, first * cols, rows * cols, _buffer(bufs, "w", info.base.row_bytes * rows, torch.uint8))
    out.copy_(w.view(rows, cols))
    for factor in info.factors:
        out.add_(_delta(files, factor, first, rows, cols, bufs))


def _delta(files: InputFiles, f: LoraFactor, first: int, rows: int, cols: int, bufs: Buffers | None) -> torch.Tensor:
    """s · ΔW[rows] in float32."""
    if f.kind == BIAS:
        raw = _read(files, f.b, first, rows, _buffer(bufs, "row", rows * itemsize(f.b.dtype), torch.uint8))
        acc = _buffer(bufs, "acc", rows, torch.float32).view(rows, 1)
        acc.copy_(raw.view(rows, 1))
        return acc.mul_(f.scale)
    left = _row_factor(files, f, first, rows, bufs)  # [r, rows]
    right = _whole_factor(files, f, bufs)  # [r, cols]
    acc = _buffer(bufs, "acc", rows * cols, torch.float32).view(rows, cols)
    tmp = _buffer(bufs, "tmp", rows * cols, torch.float32).view(rows, cols)
    torch.mul(left[0].unsqueeze(1), right[0].unsqueeze(0), out=acc)
    for k in range(1, f.rank):
        torch.mul(left[k].unsqueeze(1), right[k].unsqueeze(0), out=tmp)
        acc.add_(tmp)
    return acc.mul_(f.scale)


def _row_factor(files: InputFiles, f: LoraFactor, first: int, rows: int, bufs: Buffers | None) -> torch.Tensor:
    """L transposed, [r, rows] float32: B[rows, :]ᵀ (LINEAR) or A[:, rows] (TRANSPOSED)."""
    r = f.rank
    src = f.row_factor
    size = itemsize(src.dtype)
    raw = _buffer(bufs, "row", rows * r * size, torch.uint8)
    out = _buffer(bufs, "left", r * rows, torch.float32).view(r, rows)
    if f.kind == LINEAR:  # B is [out, r]: its rows are contiguous
        out.copy_(_read(files, src, first * r, rows * r, raw).view(rows, r).t())
    else:  # A is [r, n]: one read of `rows` elements per rank
        n = src.shape[1]
        for k in range(r):
            out[k].copy_(_read(files, src, k * n + first, rows, raw))
    return out


def _whole_factor(files: InputFiles, f: LoraFactor, bufs: Buffers | None) -> torch.Tensor:
    """R, [r, cols] float32: A (LINEAR) or Bᵀ (TRANSPOSED)."""
    src = f.whole_factor
    raw = _read(files, src, 0, src.numel, _buffer(bufs, "whole-raw", src.nbytes, torch.uint8)).view(src.shape)
    out = _buffer(bufs, "whole", src.numel, torch.float32)
    if f.kind == LINEAR:
        return out.view(src.shape).copy_(raw)
    return out.view(src.shape[1], src.shape[0]).copy_(raw.t())
