"""Index pickled ``pytorch_model*.bin`` checkpoints without loading them, and without running code.

A checkpoint written by ``torch.save`` (zip format, torch ≥ 1.6) is a zip archive: ``data.pkl``
describes each tensor (storage key, dtype, offset, shape, strides) and every storage is an
uncompressed member ``data/<key>``. We unpickle ``data.pkl`` with an allow-list — only the handful
of callables a state dict needs, like ``torch.load(weights_only=True)`` — that records where each
tensor's bytes are instead of building it. The result is the same byte-range ``TensorInfo`` that
safetensors headers give, so the executor reads ``.bin`` inputs by ``pread`` too: one chunk at a
time, never a whole shard, and a malicious pickle is refused before anything runs.
"""

from __future__ import annotations

import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekitlite.errors import CheckpointError
from mergekitlite.io.safetensors_header import TensorInfo, itemsize

_STORAGE_CODES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
_DTYPE_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


@dataclass(frozen=True)
class _StorageRef:
    key: str
    code: str


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _DType:
    code: str


def _rebuild_tensor(storage: _StorageRef, offset: int, size: Any, stride: Any, *_args: Any) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: _TensorRef, *_args: Any) -> _TensorRef:
    return data


class _IndexUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: Path):
        import io

        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _STORAGE_CODES:
            return _DType(_STORAGE_CODES[name])
        if module == "torch" and name in _DTYPE_CODES:
            return _DType(_DTYPE_CODES[name])
        if module == "torch" and name == "device":
            return str
        raise CheckpointError(
            f"{self.source}: refusing to unpickle '{module}.{name}': only tensors and dicts are allowed in a "
            "weights file (unpickling arbitrary objects can run code). Convert the checkpoint to safetensors "
            "in a sandbox if you trust it."
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unsupported storage reference {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if isinstance(storage_type, _DType):
            return _StorageRef(key, storage_type.code)
        raise CheckpointError(f"{self.source}: unsupported storage type {storage_type!r}")


def _data_offset(f: Any, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored member's bytes (after its local header)."""
    f.seek(info.header_offset)
    header = f.read(30)
    if header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"corrupt zip member {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for dim, st in zip(reversed(shape), reversed(stride)):
        if dim != 1 and st != expected:
            return False
        expected *= dim
    return True


def read_bin_index(path: Path) -> dict[str, TensorInfo]:
    """Name → byte range of every tensor in a ``torch.save`` zip checkpoint."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: a legacy (pre-zip) torch checkpoint; re-save it with a current torch or convert it to safetensors"
        )
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: not a torch checkpoint (no single data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            obj = _IndexUnpickler(zf.read(pkl[0]), path).load()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read the checkpoint's index ({type(exc).__name__}: {exc})") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
        out: dict[str, TensorInfo] = {}
        for name, ref in obj.items():
            if not isinstance(ref, _TensorRef):
                continue  # non-tensor entries (e.g. an int step counter) are not weights
            if not _contiguous(ref.shape, ref.stride):
                raise CheckpointError(f"{path}: tensor {name!r} is stored non-contiguously; re-save it contiguous")
            member = zf.getinfo(f"{prefix}data/{ref.storage.key}")
            if member.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{path}: storage of {name!r} is compressed; cannot read it lazily")
            size = itemsize(ref.storage.code)
            begin = _data_offset(raw, member) + ref.offset * size
            nbytes = math.prod(ref.shape) * size
            if ref.offset * size + nbytes > member.file_size:
                raise CheckpointError(f"{path}: tensor {name!r} runs past the end of its storage")
            out[str(name)] = TensorInfo(str(name), path, ref.storage.code, ref.shape, begin, begin + nbytes)
        return out
