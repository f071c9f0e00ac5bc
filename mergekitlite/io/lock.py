"""An exclusive, process-lifetime lock on a path: two merges must never write the same output.

The lock is ``flock`` on a small file. The kernel releases it when the holding process ends, however
it ends (``kill -9`` included), so a lock file left behind by a dead merge never blocks the next one:
the file's contents (the holder's pid) are only ever used to word the refusal, never to decide it.
The holder removes the file when it is done; whoever opened the old file meanwhile notices (its inode
is no longer the one at the path) and tries again on the new one.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from mergekitlite.errors import OutputError, OutputLockedError, explain_os_error

# flock on a file system that does not support it (some FUSE and network mounts).
_UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class PathLock:
    """``with PathLock(lock_file, what):`` holds the lock or raises OutputLockedError naming the holder.
    ``supported`` is False where the file system has no locks (then nothing is held)."""

    def __init__(self, path: Path, what: Path):
        self.path = path
        self.what = what  # the path being protected, for the messages
        self.fd = -1
        self.supported = True

    def acquire(self) -> PathLock:
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputLockedError(
                        f"another merge (pid {holder or 'unknown'}) is writing {self.what}: wait for it to finish "
                        f"or stop it; its lock is {self.path}"
                    ) from None
                if exc.errno in _UNSUPPORTED:
                    self.supported = False
                    return self
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
        self.fd = fd
        try:  # only for the message of a merge that is refused: a full disk must not stop this one
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        return self

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            text = explain_os_error(exc, self.path, writing=True)
            if text is None:
                raise
            raise OutputError(f"cannot create the lock for {self.what}: {text}") from None

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)  # while still holding it, so nobody else can be holding this file
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PathLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)
