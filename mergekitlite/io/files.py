"""Byte-range reading of inputs and positioned writing of output shards.

Inputs are read with ``pread`` into fresh buffers rather than memory-mapped: a map that has
touched 28 GB of a checkpoint shows 28 GB resident even though the kernel may drop it, and that
is what users (and OOM killers) look at. Outputs are written with ``pwrite`` at offsets fixed by
the plan, so tensors can be written in any order and a resumed merge simply fills in the rest.
"""

from __future__ import annotations

import os
import threading
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

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
