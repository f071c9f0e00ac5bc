"""Byte-range reading of inputs and positioned writing of output shards.

Inputs are read with ``pread`` into fresh buffers rather than memory-mapped: a map that has
touched 28 GB of a checkpoint shows 28 GB resident even though the kernel may drop it, and that
is what users (and OOM killers) look at. Outputs are written with ``pwrite`` at offsets fixed by
the plan, so tensors can be written in any order and a resumed merge simply fills in the rest.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from mergekitlite.errors import CheckpointError
from mergekitlite.io.safetensors_header import ShardLayout, TensorInfo


class InputFiles:
    """Keeps one read-only descriptor per input file; safe to use from several threads."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._fds[path] = fd
            return fd

    def read(self, info: TensorInfo, start: int, length: int) -> bytearray:
        """``length`` bytes of ``info``'s data starting ``start`` bytes into it."""
        buf = bytearray(length)
        self.read_into(info, start, memoryview(buf))
        return buf

    def read_into(self, info: TensorInfo, start: int, out: memoryview) -> None:
        """Fill ``out`` with ``info``'s data starting ``start`` bytes into it."""
        fd = self._fd(info.file)
        pos = info.begin + start
        done = 0
        while done < len(out):
            n = os.preadv(fd, [out[done:]], pos + done)
            if n == 0:
                raise CheckpointError(f"{info.file}: unexpected end of file reading {info.name!r} (file changed?)")
            done += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> InputFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardFile:
    """An output shard: its header is written on creation, tensor bytes go to planned offsets."""

    def __init__(self, path: Path, layout: ShardLayout, *, reuse: bool = False):
        self.path = path
        self.layout = layout
        self._lock = threading.Lock()
        self._dirty = 0
        exists = path.exists()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not (reuse and exists):
                os.ftruncate(self.fd, 0)
                _preallocate(self.fd, layout.size)
                os.pwrite(self.fd, layout.header, 0)
            elif os.fstat(self.fd).st_size != layout.size:
                os.ftruncate(self.fd, layout.size)
        except BaseException:
            self.close()
            raise

    def write(self, name: str, start: int, data: memoryview) -> None:
        begin, end = self.layout.offsets[name]
        if begin + start + len(data) > end:
            raise ValueError(f"write past the end of {name!r} in {self.path.name}")
        pos = begin + start
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], pos + done)
        with self._lock:
            self._dirty += len(data)
            kick = self._dirty >= WRITEBACK_EVERY
            if kick:
                self._dirty = 0
        if kick:
            start_writeback(self.fd)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# Start the disk writing the output while the merge goes on, every this many bytes per shard, so
# that the fsync before the final rename finds little left to do (the page cache would otherwise
# hold gigabytes of dirty output and write it only when the merge has finished).
WRITEBACK_EVERY = 64 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int], None] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def start(fd: int) -> None:
        fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # non-blocking; failures only mean no head start

    return start


_sync_file_range = _load_sync_file_range() if sys.platform.startswith("linux") else None


def start_writeback(fd: int) -> None:
    """Ask the kernel to begin writing ``fd``'s dirty pages now, without waiting (Linux only)."""
    if _sync_file_range is not None:
        _sync_file_range(fd)


def _preallocate(fd: int, size: int) -> None:
    """Reserve the shard's blocks now, so a full disk fails here, not halfway through a shard."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno in (28,):  # ENOSPC
                raise
            # Filesystems without fallocate support: fall through to a sparse file.
    os.ftruncate(fd, size)
