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
from typing import TYPE_CHECKING, Any

from mergekitlite.errors import CheckpointError, one_line
from mergekitlite.io.inputs import input_file_size, open_input

if TYPE_CHECKING:
    import torch

# safetensors dtype code → (torch dtype name, bytes per element). Names, not torch dtypes: reading headers and
# planning import no torch (see ``torch_dtype``).
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
CODE_BY_NAME = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
NAME_BY_CODE = {v: k for k, v in CODE_BY_NAME.items()}

MAX_HEADER = 100_000_000  # the reference implementation's limit (MAX_HEADER_SIZE in safetensors/src/tensor.rs)
# Every dtype code the reference implementation knows; a file with another one is corrupt, a file
# with one of these that DTYPES lacks is valid but not something we compute with.
KNOWN_CODES = frozenset(
    {
        *("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"),
        *("F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64"),
        *("F64", "I64", "U64"),
    }
)


def itemsize(code: str) -> int:
    return DTYPES[code][1]


def torch_dtype(code: str) -> torch.dtype:
    import torch  # only the code that computes with torch asks for its dtypes

    return getattr(torch, DTYPES[code][0])  # type: ignore[no-any-return]


def code_of(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    for code, (torch_name, _) in DTYPES.items():
        if torch_name == name:
            return code
    raise KeyError(f"no safetensors dtype code for {dtype}")


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
    """Parse the header of ``path``: tensor infos (absolute offsets) and the ``__metadata__`` map.

    As strict as the reference implementation (safetensors' ``Metadata::validate`` and
    ``read_metadata``), and then some: every refusal names the file and, where there is one, the
    tensor. Only the header is read. The safetensors library itself is asked last, so that nothing it
    refuses is ever read here, whatever a future format rule adds."""
    size = input_file_size(path)
    with open_input(path) as f:
        n = _header_length(path, f.read(8), size)
        raw = f.read(n)
    header = _parse_json(path, raw)
    metadata = _metadata(path, header.pop("__metadata__", None))
    entries = {name: _entry(path, name, value) for name, value in header.items()}
    data_len = _check_layout(path, entries)
    data_start = 8 + n
    if data_start + data_len != size:
        if data_start + data_len > size:
            raise CheckpointError(
                f"{path}: truncated: its tensors end at byte {data_start + data_len} but the file has {size} "
                "(an interrupted download? delete the file and download it again)"
            )
        raise CheckpointError(
            f"{path}: {size - data_start - data_len} unexpected byte(s) after the last tensor "
            f"(the file has {size}, its header accounts for {data_start + data_len}): {_REDO}"
        )
    _library_accepts(path)
    tensors = {
        name: TensorInfo(name, path, code, shape, data_start + begin, data_start + end)
        for name, (code, shape, begin, end) in entries.items()
    }
    return tensors, metadata


# Every header refusal ends with what to do about it.
_REDO = "the file is corrupt or was not written by a safetensors writer; download or export it again"
# The reference implementation's types: sizes and offsets are ``usize``, and products of shapes are
# overflow-checked in it.
_USIZE = 2**64


def _header_length(path: Path, raw: bytes, size: int) -> int:
    if len(raw) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes): {_REDO}")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER:
        raise CheckpointError(
            f"{path}: not a safetensors file (header length {n} exceeds the format's limit of {MAX_HEADER}): {_REDO}"
        )
    if n + 8 > size:
        raise CheckpointError(
            f"{path}: not a safetensors file or truncated (header length {n}, file size {size}): {_REDO}"
        )
    return n


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return found


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: the header is not UTF-8 ({exc.reason} at byte {exc.start}): {_REDO}") from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except RecursionError:  # Python's parser recurses; serde_json (the library's) stops at 128 levels
        raise CheckpointError(f"{path}: the header's JSON nests absurdly deep: {_REDO}") from None
    except _DuplicateKey as exc:
        raise CheckpointError(f"{path}: the header names {exc.args[0]!r} twice: {_REDO}") from None
    except ValueError as exc:  # JSONDecodeError included
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc}): {_REDO}") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object): {_REDO}"
        )
    return header


def _metadata(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CheckpointError(f"{path}: '__metadata__' must map strings to strings, found {_short(value)}: {_REDO}")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _count(value: Any) -> bool:
    """A non-negative integer the reference implementation can hold (JSON booleans are not numbers)."""
    return type(value) is int and 0 <= value < _USIZE


def _entry(path: Path, name: str, value: Any) -> tuple[str, tuple[int, ...], int, int]:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {what}: {_REDO}")

    if not isinstance(value, dict):
        raise bad(f"its header entry is {_short(value)}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in value]
    if missing:
        raise bad(f"its header entry has no {', '.join(missing)}")
    code, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(code, str) or code not in KNOWN_CODES:
        raise bad(f"unknown dtype {_short(code)}")
    if code not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {code}, which mergekitlite does not read "
            f"(it reads {', '.join(DTYPES)}); convert the checkpoint"
        )
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise bad(f"shape {_short(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(x) for x in offsets)):
        raise bad(f"data_offsets {_short(offsets)} is not a pair of non-negative integers")
    begin, end = offsets
    if end < begin:
        raise bad(f"data_offsets {offsets} end before they begin")
    numel = 1
    for d in shape:
        numel *= d
        if numel >= _USIZE:  # the reference implementation's overflow check, dimension by dimension
            raise bad(f"shape {shape} has more elements than a file can hold")
    expected = numel * itemsize(code)
    if end - begin != expected:
        raise bad(f"data_offsets {offsets} span {end - begin} bytes but {code}{shape} needs {expected}")
    return code, tuple(shape), begin, end


def _check_layout(path: Path, entries: Mapping[str, tuple[str, tuple[int, ...], int, int]]) -> int:
    """Tensors must tile the data section: sorted by offset, each begins where the previous ends
    (no overlap, no hole), the first at 0. Returns the data section's length."""
    pos, prev = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < pos:
            raise CheckpointError(
                f"{path}: tensor {name!r}: its bytes [{begin}, {end}) overlap those of {prev!r}: {_REDO}"
            )
        if begin > pos:
            after = f"after {prev!r}" if prev is not None else "at the start of the data"
            raise CheckpointError(
                f"{path}: tensor {name!r}: a hole of {begin - pos} unused byte(s) {after} precedes it: {_REDO}"
            )
        pos, prev = end, name
    return pos


def _library_accepts(path: Path) -> None:
    """The safetensors library's own verdict on the header (it maps the file; reads no weights)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except Exception as exc:  # SafetensorError and whatever a newer version raises
        reason = one_line(exc)
        raise CheckpointError(f"{path}: the safetensors library refuses this file ({reason}): {_REDO}") from None


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
