"""Telling whether an input file is the one it was: its identity, and the rule that proves sameness.

A file's *identity* is (device, inode, size, mtime, ctime). Size and mtime alone are not enough: a
file rewritten in place keeps its size, and ``touch -d`` (or ``os.utime``) sets the mtime back. The
ctime cannot be set back: every write, truncate, rename or ``utime`` moves it to "now". So a file
whose identity is unchanged has, short of a clock set back or a raw write to the disk, the same
contents; a file whose identity changed may or may not (``chmod`` moves the ctime too).

A merge that runs in several attempts (``--resume``) observes every input's identity at the start of
each attempt and before it finalises, and records sha256 digests together with the identity the file
had while it was hashed. The contents are proven the same throughout when every observed identity
is one and the same, or when every observed identity has a digest and the digests agree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path


def identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def file_identity(path: Path) -> str:
    return identity(os.stat(path))


def unproven(seen: Iterable[str], hashes: Mapping[str, str]) -> str | None:
    """Why the contents behind the identities ``seen`` (in the order observed) are not proven the
    same, or None when they are. ``hashes`` maps identities to the sha256 the file had under them."""
    distinct = list(dict.fromkeys(seen))
    if len(distinct) <= 1:
        return None
    missing = [i for i in distinct if i not in hashes]
    if missing:
        return "it changed (size, times or inode), and not every version of it was hashed to compare"
    digests = list(dict.fromkeys(hashes[i] for i in distinct))
    if len(digests) > 1:
        return f"its contents changed (sha256 {digests[0][:12]}… then {digests[-1][:12]}…)"
    return None


def lost_for_good(seen: Iterable[str], hashes: Mapping[str, str], current: str) -> str | None:
    """Like :func:`unproven`, but only for what can no longer be repaired by hashing the file now:
    an identity observed earlier, other than the ``current`` one, without a digest."""
    distinct = list(dict.fromkeys([*seen, current]))
    if len(distinct) > 1 and any(i not in hashes for i in distinct if i != current):
        return "it changed (size, times or inode) since the partial output was started, which never hashed it"
    return None
