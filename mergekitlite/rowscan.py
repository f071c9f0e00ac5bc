"""Reading a 1- or 2-D (or scalar) tensor's rows in chunks, converted to float64: how the commands that
look at models (diff, inspect) go through a 14B checkpoint in a few tens of MB."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mergekitlite.budget import CACHE_CHUNK_ELEMENTS
from mergekitlite.io.files import InputFiles
from mergekitlite.io.safetensors_header import TensorInfo, torch_dtype


def row_count(info: TensorInfo) -> int:
    """Rows of ``info``; a scalar is one row."""
    return info.shape[0] if info.shape else 1


def rows_in_chunk(info: TensorInfo, chunk_elements: int) -> int:
    """How many rows of ``info`` make about ``chunk_elements`` elements (at least one)."""
    rows = row_count(info)
    per_row = max(1, info.numel // max(rows, 1))
    return max(1, min(rows, chunk_elements // per_row))


def read_rows(files: InputFiles, info: TensorInfo, first: int, count: int) -> torch.Tensor:
    """Rows ``first .. first+count`` of ``info``, flattened, as float64."""
    raw = files.read(info, first * info.row_bytes, count * info.row_bytes)
    return torch.frombuffer(raw, dtype=torch_dtype(info.dtype)).to(torch.float64)


def row_ranges(info: TensorInfo, chunk_elements: int = CACHE_CHUNK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """``(first, count)`` of each chunk of rows, in order."""
    rows, step = row_count(info), rows_in_chunk(info, chunk_elements)
    for first in range(0, rows, step):
        yield first, min(step, rows - first)
