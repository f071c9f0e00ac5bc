"""Micro-benchmark: one chunk worker's merge step, torch path vs the fused native kernel.

No I/O. ``execute.merge_chunk`` is called on the raw bf16 bytes of a chunk, exactly as a worker
calls it after its preads, once with the task's ``LinearForm`` (native kernel) and once without
(torch: upcast every input, one op per pass, cast back), single-threaded, with the worker's reusable
buffers. Rounds alternate between the two; the report gives medians and their ratio, and checks
that both produce the same bytes.

    python bench/micro_native.py --models 2 --elements 256K --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import harness
import torch

from mergekitlite.execute import ChunkBuffers, merge_chunk, native_form
from mergekitlite.io.safetensors_header import TensorInfo
from mergekitlite.methods import ChunkInfo, native
from mergekitlite.taskgraph import InputRef, TensorTask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=2, help="fine-tunes besides the base")
    ap.add_argument("--elements", default="256K", help="chunk size (the CPU default is 256K)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=50, help="chunks per timed round")
    args = ap.parse_args()
    if not native.available():
        raise SystemExit("the native kernel is not built (pip install -e . with a C compiler)")
    torch.set_num_threads(1)
    n = harness.count(args.elements)
    cols = 4096
    rows = max(1, n // cols)
    shape = (rows, cols)

    def ref(i: int) -> InputRef:
        info = TensorInfo(name="w", dtype="BF16", shape=shape, file=f"m{i}", begin=0, end=rows * cols * 2)
        return InputRef(model=f"m{i}", tensor=info)

    task = TensorTask(
        name="w",
        method="task_arithmetic",
        base=ref(0),
        models=tuple(ref(i + 1) for i in range(args.models)),
        params=(("weight", (1.0,) * args.models), ("normalize", False), ("lambda", 1.0)),
        shape=shape,
        out_dtype="BF16",
        layer=0,
        t=0.0,
        chunk_rows=rows,
    )
    g = torch.Generator().manual_seed(0)
    raw = [torch.randn(shape, generator=g).to(torch.bfloat16).view(torch.uint8).reshape(-1) for _ in task.inputs]
    info = ChunkInfo(0, rows, shape, 0)
    form = native_form(task, torch.float32, torch.device("cpu"))
    assert form is not None
    bufs = ChunkBuffers()
    results = {}
    times: dict[str, list[float]] = {"torch": [], "native": []}
    for _ in range(args.rounds):
        for label, f in (("torch", None), ("native", form)):
            t0 = time.perf_counter()
            for _ in range(args.repeat):
                out, _ = merge_chunk(task, raw, info, torch.float32, torch.device("cpu"), None, bufs, f)
            times[label].append((time.perf_counter() - t0) / args.repeat / (rows * cols) * 1e9)
            results[label] = bytes(out)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"task_arithmetic, base + {args.models} models, bf16 → bf16, {rows}×{cols} chunk, one thread")
    for k, v in times.items():
        print(f"  {k:6s}: median {med[k]:.2f} ns/element (min {min(v):.2f}, max {max(v):.2f}, {len(v)} rounds)")
    print(f"  torch / native: {med['torch'] / med['native']:.2f}×; same bytes: {results['torch'] == results['native']}")


if __name__ == "__main__":
    main()
