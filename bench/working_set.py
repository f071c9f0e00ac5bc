"""Print every method's measured working space next to its declaration (MethodSpec.temporaries).

The measurement is mergekitlite.working_space's (also asserted by tests/test_working_set.py): heap bytes
in use (glibc mallinfo2) sampled after every torch operation of one chunk's statistic passes and merge,
at two chunk sizes; the growth per element, in chunk-sized float32 arrays.

    python bench/working_set.py
"""

from __future__ import annotations

import torch

from mergekitlite import working_space
from mergekitlite.methods import get_method


def main() -> None:
    if not working_space.available():
        raise SystemExit("needs glibc's mallinfo2 to count heap bytes")
    torch.set_num_threads(1)
    working_space.warm_up()
    print("| method | models | statistic pass | merge + bf16 cast | declared |")
    print("|---|---:|---:|---:|---:|")
    for name, n in working_space.cases():
        spec = get_method(name)
        stats, merge = working_space.arrays(spec, n)
        print(f"| {name} | {n} | {stats:.2f} | {merge:.2f} | {spec.temporaries(n)} |")


if __name__ == "__main__":
    main()
