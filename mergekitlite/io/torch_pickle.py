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
import pickletools
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekitlite.errors import CheckpointError
from mergekitlite.io.inputs import input_file_size, open_input
from mergekitlite.io.safetensors_header import DTYPES, TensorInfo, itemsize

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


# Where torch.save says a storage lived (the bytes are read on the host whatever it says).
_LOCATION = re.compile(r"(cpu|cuda|mps|xpu|hpu|meta)(:\d+)?")


@dataclass(frozen=True)
class _StorageRef:
    key: str
    code: str
    numel: Any  # elements, as the pickle says (torch.load checks it against the archive member)


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _DType:
    code: str


# The allow-listed callables take exactly the arguments torch's own do (torch.load refuses other calls):
# _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]).
def _rebuild_tensor(
    storage: _StorageRef, offset: int, size: Any, stride: Any, _grad: Any, _hooks: Any, _meta: Any = None
) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _device(kind: Any, index: Any = None) -> str:
    """``torch.device(...)`` as a state dict records it: ``("cpu")`` or ``("cuda", 0)``, nothing else."""
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise TypeError(f"torch.device({kind!r}, {index!r})")
    return kind


def _rebuild_parameter(data: _TensorRef, _grad: Any, _hooks: Any) -> _TensorRef:
    if not isinstance(data, _TensorRef):
        raise TypeError(f"a parameter of {type(data).__name__}, not of a tensor")
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
            return _device
        raise CheckpointError(
            f"{self.source}: refusing to unpickle {module + '.' + name!r}: only tensors and dicts are allowed in a "
            "weights file (unpickling arbitrary objects can run code). Convert the checkpoint to safetensors "
            "in a sandbox if you trust it."
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unsupported storage reference {pid!r}")
        storage_type, key, location = pid[1], str(pid[2]), pid[3]
        if not (isinstance(location, str) and _LOCATION.fullmatch(location)):
            raise CheckpointError(f"{self.source}: unknown storage location {location!r} (a corrupt checkpoint)")
        if isinstance(storage_type, _DType):
            return _StorageRef(key, storage_type.code, pid[4])
        raise CheckpointError(f"{self.source}: unsupported storage type {storage_type!r}")


def _data_offset(path: Path, f: Any, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored member's bytes (after its local header)."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path}: corrupt zip member {info.filename}; save the checkpoint again")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    if f.read(name_len) != info.filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise CheckpointError(f"{path}: corrupt zip member {info.filename}; save the checkpoint again")
    return info.header_offset + 30 + name_len + extra_len


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for dim, st in zip(reversed(shape), reversed(stride)):
        if dim != 1 and st != expected:
            return False
        expected *= dim
    return True


# The pickled index of a state dict is kilobytes; a bigger one is not a weights file (or is a zip bomb).
MAX_INDEX_BYTES = 256 * 1024 * 1024


def read_bin_index(path: Path) -> dict[str, TensorInfo]:
    """Name → byte range of every tensor in a ``torch.save`` zip checkpoint."""
    size = input_file_size(path)
    with open_input(path) as raw:
        if not zipfile.is_zipfile(raw):
            raise CheckpointError(
                f"{path}: a legacy (pre-zip) torch checkpoint; re-save it with a current torch or convert it to "
                "safetensors"
            )
        try:
            with zipfile.ZipFile(raw) as zf:
                obj, members, prefix = _unpickle_index(path, zf)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
            raise CheckpointError(f"{path}: a corrupt zip archive ({exc}); save the checkpoint again") from None
        out: dict[str, TensorInfo] = {}
        for name, ref in obj.items():
            if not isinstance(ref, _TensorRef):
                continue  # non-tensor entries (e.g. an int step counter) are not weights
            info = _tensor_info(path, raw, size, str(name), ref, members.get(f"{prefix}data/{_key(ref)}"))
            if info.name in out:
                raise CheckpointError(f"{path}: the state dict names {info.name!r} twice")
            out[info.name] = info
        return out


# torch.save writes protocol 2 (4 on request). Protocol 5's out-of-band buffers and the extension
# registry have no place in a state dict; BYTEARRAY8 with a forged length even upsets the interpreter.
_OPCODES = frozenset(op.name for op in pickletools.opcodes if op.proto <= 4) - {"EXT1", "EXT2", "EXT4"}


def _check_opcodes(path: Path, data: bytes) -> None:
    """Walk the pickle's opcodes (nothing is built) and refuse the ones a state dict never uses."""
    try:
        for op, _, pos in pickletools.genops(data):
            if op.name not in _OPCODES:
                raise CheckpointError(
                    f"{path}: its data.pkl uses the pickle opcode {op.name} (at byte {pos}), which no state dict "
                    "saved by torch does; refusing it"
                )
    except ValueError as exc:
        reason = " ".join(str(exc).split())
        raise CheckpointError(f"{path}: a corrupt checkpoint index (data.pkl: {reason})") from None


def _unpickle_index(path: Path, zf: zipfile.ZipFile) -> tuple[dict[Any, Any], dict[str, zipfile.ZipInfo], str]:
    members = {m.filename: m for m in zf.infolist()}
    pkl = [n for n in members if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise CheckpointError(f"{path}: not a torch checkpoint (no single data.pkl)")
    if members[pkl[0]].file_size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{path}: its data.pkl claims {members[pkl[0]].file_size} bytes; not a weights file")
    try:
        data = zf.read(pkl[0])
        _check_opcodes(path, data)
        obj = _IndexUnpickler(data, path).load()
    except CheckpointError:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split())  # one line, whatever the pickle put in the message
        raise CheckpointError(f"{path}: cannot read the checkpoint's index ({type(exc).__name__}: {reason})") from None
    _check_byteorder(path, zf, members.get(pkl[0][: -len("data.pkl")] + "byteorder"))
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj, members, pkl[0][: -len("data.pkl")]


def _check_byteorder(path: Path, zf: zipfile.ZipFile, member: zipfile.ZipInfo | None) -> None:
    """Tensor bytes are read as little-endian; torch records the writer's byte order (older files do
    not, and are little-endian)."""
    if member is None:
        return
    order = zf.read(member) if member.file_size <= 16 else b"?"
    if order != b"little":
        raise CheckpointError(
            f"{path}: saved with byte order {order.decode('ascii', 'replace')!r}; only little-endian checkpoints "
            "can be read in place: load and re-save it on a little-endian machine, or convert it to safetensors"
        )


def _key(ref: _TensorRef) -> str:
    return ref.storage.key if isinstance(ref.storage, _StorageRef) else ""


def _tensor_info(
    path: Path, raw: Any, size: int, name: str, ref: _TensorRef, member: zipfile.ZipInfo | None
) -> TensorInfo:
    """Where ``ref``'s bytes are, after checking every field: the pickle's BUILD opcode can set any
    attribute of an object it made, so nothing the constructors checked can be relied on."""

    def counts(values: Any) -> bool:
        return isinstance(values, tuple) and all(type(v) is int and v >= 0 for v in values)

    storage = ref.storage
    if not (isinstance(storage, _StorageRef) and isinstance(storage.key, str) and storage.code in DTYPES):
        raise CheckpointError(f"{path}: tensor {name!r} has an unreadable storage reference")
    if not (counts(ref.shape) and counts(ref.stride) and type(ref.offset) is int and ref.offset >= 0):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape, stride or offset in the pickle")
    if not _contiguous(ref.shape, ref.stride):
        raise CheckpointError(f"{path}: tensor {name!r} is stored non-contiguously; re-save it contiguous")
    if member is None:
        raise CheckpointError(f"{path}: the storage of {name!r} (data/{storage.key}) is not in the archive")
    if member.compress_type != zipfile.ZIP_STORED or member.flag_bits & 0x1:
        raise CheckpointError(f"{path}: storage of {name!r} is compressed or encrypted; cannot read it lazily")
    item = itemsize(storage.code)
    if type(storage.numel) is not int or storage.numel * item != member.file_size:
        raise CheckpointError(
            f"{path}: the storage of {name!r} holds {member.file_size} bytes, but the pickle says "
            f"{storage.numel!r} elements of {item} bytes (a corrupt checkpoint)"
        )
    begin = _data_offset(path, raw, member) + ref.offset * item
    nbytes = math.prod(ref.shape) * item
    if ref.offset * item + nbytes > member.file_size or begin + nbytes > size:
        raise CheckpointError(f"{path}: tensor {name!r} runs past the end of its storage")
    return TensorInfo(name, path, storage.code, ref.shape, begin, begin + nbytes)
