"""The I/O floor of a merge: read every input byte once, write an output-sized file set.

Run as its own process (by run_bench.py) so it is timed and measured like the merge tools. It
reads the fine-tunes' shards and copies the base's shards to OUT (the base's shards are exactly
output-sized), all with plain ``readinto``/``write`` through one 16 MiB buffer: no arithmetic, no
mmap, no extra copies. ``--sync-every BYTES`` fsyncs after that many bytes written and at the end,
as ``merge`` does for its resume journal (run_bench.py passes merge's interval); 0 never fsyncs, as mergekit
does.

    python bench/io_floor.py OUT --copy base/*.safetensors --read ft1/*.safetensors ft2/*.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from procstats import read_files

BUFFER = 16 * 1024 * 1024


def copy_file(src: Path, dst: Path, buf: bytearray, sync_every: int) -> int:
    view = memoryview(buf)
    total = unsynced = 0
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        while n := fin.readinto(buf):
            written = 0
            while written < n:
                written += fout.write(view[written:n])
            total += n
            unsynced += n
            if sync_every and unsynced >= sync_every:
                os.fsync(fout.fileno())
                unsynced = 0
        if sync_every:
            os.fsync(fout.fileno())
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="read inputs, write an output-sized copy; report seconds as JSON")
    ap.add_argument("out", type=Path)
    ap.add_argument("--copy", type=Path, nargs="+", required=True, help="files read and copied into OUT")
    ap.add_argument("--read", type=Path, nargs="*", default=[], help="files only read")
    ap.add_argument("--sync-every", type=int, default=512 * 1000 * 1000)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    buf = bytearray(BUFFER)
    read, read_s = read_files(args.read)
    t1 = time.perf_counter()
    copied = sum(copy_file(p, args.out / p.name, buf, args.sync_every) for p in args.copy)
    t2 = time.perf_counter()
    print(json.dumps({"read_only_s": read_s, "copy_s": t2 - t1, "bytes_read": read + copied, "bytes_written": copied}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
