"""safetensors headers: read one without touching the weights, and lay one out for writing.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the header),
then the raw bytes. Knowing every offset up front is what lets us read any row range of any
tensor with one ``pread``, and write an output shard's header before its first tensor is merged.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekitlite.errors import CheckpointError

# safetensors dtype code → (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
CODE_BY_NAME = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
NAME_BY_CODE = {v: k for k, v in CODE_BY_NAME.items()}
CODE_BY_TORCH = {t: code for code, (t, _) in DTYPES.items()}

MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


def itemsize(code: str) -> int:
    return DTYPES[code][1]


def torch_dtype(code: str) -> torch.dtype:
    return DTYPES[code][0]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``file[begin:end]``, row-major and contiguous."""

    name: str
    file: Path
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    begin: int  # absolute offset in file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along dim 0 (the whole tensor for scalars)."""
        if not self.shape or self.shape[0] == 0:
            return self.nbytes
        return self.nbytes // self.shape[0]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse the header of ``path``: tensor infos (absolute offsets) and the ``__metadata__`` map."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER or n + 8 > size:
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated (header length {n}, file size {size})"
                )
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            code = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {name!r}: {entry!r}") from None
        if code not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
        expected = math.prod(shape) * itemsize(code)
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} spans {end - begin} bytes but {code}{list(shape)} needs {expected}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} "
                "(an interrupted download? delete the file and download it again)"
            )
        tensors[name] = TensorInfo(name, path, code, shape, data_start + begin, data_start + end)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


@dataclass(frozen=True)
class ShardLayout:
    """An output shard whose header is fixed before any tensor is computed."""

    filename: str
    header: bytes  # length prefix + JSON, padded to 8 bytes
    offsets: Mapping[str, tuple[int, int]]  # absolute [begin, end) of each tensor in the file
    order: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(e - b for b, e in self.offsets.values())


def layout_shard(
    filename: str,
    tensors: Sequence[tuple[str, str, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> ShardLayout:
    """Lay out ``(name, dtype code, shape)`` tensors contiguously, in the given order."""
    entries: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    rel: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, code, shape in tensors:
        nbytes = math.prod(shape) * itemsize(code)
        entries[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        rel[name] = (pos, pos + nbytes)
        pos += nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    # Pad with spaces (allowed by the format) so tensor data starts 8-byte aligned.
    body += b" " * (-(8 + len(body)) % 8)
    header = struct.pack("<Q", len(body)) + body
    base = len(header)
    offsets = {k: (base + b, base + e) for k, (b, e) in rel.items()}
    return ShardLayout(filename, header, offsets, tuple(name for name, _, _ in tensors))


def fadvise_sequential(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
