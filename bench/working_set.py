"""Print every method's measured working space next to its declaration (MethodSpec.temporaries).

The measurement is tests/test_working_set.py's: heap bytes in use (glibc mallinfo2) sampled after
every torch operation of one chunk's statistic passes and merge, at two chunk sizes; the growth per
element, in chunk-sized float32 arrays. The test asserts measured ≤ declared; this prints the table.

    python bench/working_set.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_working_set as ws

from mergekitlite.methods import get_method


def main() -> None:
    torch.set_num_threads(1)
    ws._peak_arrays(get_method("ties"), 2, ws.ROWS[0])  # warm-up, as the test's fixture
    array_bytes = (ws.ROWS[1] - ws.ROWS[0]) * ws.COLS * 4
    print("| method | models | statistic pass | merge + bf16 cast | declared |")
    print("|---|---:|---:|---:|---:|")
    for name, n in ws._cases():
        spec = get_method(name)
        small, large = (ws._peak_arrays(spec, n, rows) for rows in ws.ROWS)
        stats, merge = ((hi - lo) / array_bytes for lo, hi in zip(small, large))
        print(f"| {name} | {n} | {stats:.2f} | {merge:.2f} | {spec.temporaries(n)} |")


if __name__ == "__main__":
    main()
