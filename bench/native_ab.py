"""Interleaved A/B of two builds of the native kernel (``mergekitlite/_native*.so``) in one process.

The same three bf16 inputs of 256K values (base + 2 models, task arithmetic) go through each build's
``linear`` in alternating rounds, for bf16, fp16 and float32 outputs; medians and their ratio. Less
sensitive to other users of the machine than two separate runs of ``micro_native.py``: both builds
see the same moments. Build the old one from a checkout of the old commit (``setup.py build_ext
--inplace``) and pass both paths:

    python bench/native_ab.py OLD.so mergekitlite/_native.cpython-311-x86_64-linux-gnu.so
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from types import ModuleType

import torch


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_native", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--repeat", type=int, default=40)
    args = ap.parse_args()
    builds = {"old": load(args.old), "new": load(args.new)}
    torch.set_num_threads(1)
    n = 256 * 1024
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=g).to(torch.bfloat16).view(torch.uint8) for _ in range(3)]
    for code, size, label in ((1, 2, "bf16"), (2, 2, "fp16"), (0, 4, "float32")):
        out = torch.empty(size * n, dtype=torch.uint8)
        call = (out.data_ptr(), code, n, [x.data_ptr() for x in xs], [1, 1, 1], (1, 2), (None, None), 0, None, None, 0)
        times: dict[str, list[float]] = {k: [] for k in builds}
        for _ in range(args.rounds):
            for k, kernel in builds.items():
                t0 = time.perf_counter()
                for _ in range(args.repeat):
                    kernel.linear(*call)
                times[k].append((time.perf_counter() - t0) / args.repeat / n * 1e9)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"bf16 ×3 → {label}: old {med['old']:.3f} ns/value, new {med['new']:.3f} ns/value, "
            f"new/old {med['new'] / med['old']:.3f}"
        )


if __name__ == "__main__":
    main()
