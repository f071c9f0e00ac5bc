"""Micro-benchmark: the sparsified task-arithmetic family, torch path vs native kernels (kernels/gta.c).

No I/O. A bf16 base and ``--models`` bf16 fine-tunes (base + small noise: many equal magnitudes, as
real checkpoints) sit in memory, cut into the executor's row chunks. Per method, single-threaded, as
one chunk worker runs them (torch: one thread per op):

* statistic passes: ``compute_stats`` over every chunk, torch (each chunk upcast to float32 into reused
  buffers, then ``update``) vs native (``update_raw`` on the raw bf16 bytes);
* merge pass: every chunk from raw bf16 bytes to raw bf16 bytes, ``execute.merge_chunk`` with and
  without the method's native kernel (reused buffers, as a worker).

Rounds alternate torch and native; the report gives medians (ns per element of the tensor, per model
count as given) and checks that both paths produce the same bytes. Also times the torch path's parts
that the profile singles out (numpy hashing of DARE masks, top-k histograms) per chunk.

    python bench/micro_gta.py --rows 1024 --cols 4096 --chunk-rows 64 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from mergekitlite import working_space
from mergekitlite.execute import ChunkBuffers, merge_chunk, native_form, native_kernel
from mergekitlite.io.safetensors_header import TensorInfo
from mergekitlite.methods import ChunkInfo, get_method
from mergekitlite.methods.apply import RawChunk, compute_stats, row_chunks
from mergekitlite.methods.primitives import bernoulli_mask, float_key, stream_key
from mergekitlite.taskgraph import InputRef, TensorTask

PARAMS = {"weight": 0.5, "density": 0.5, "gamma": 0.01, "epsilon": 0.1}


def _task(method: str, shape: tuple[int, int], n: int, params: dict[str, Any], chunk_rows: int) -> TensorTask:
    def ref(i: int) -> InputRef:
        info = TensorInfo(name="w", dtype="BF16", shape=shape, file=f"m{i}", begin=0, end=shape[0] * shape[1] * 2)
        return InputRef(model=f"m{i}", tensor=info)

    return TensorTask(
        name="w",
        method=method,
        base=ref(0),
        models=tuple(ref(i + 1) for i in range(n)),
        params=tuple(params.items()),
        shape=shape,
        out_dtype="BF16",
        layer=0,
        t=0.0,
        chunk_rows=chunk_rows,
    )


def _median_ns(fn: Callable[[], Any], rounds: int, elements: int) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        value = fn()
        times.append((time.perf_counter() - t0) / elements * 1e9)
    return statistics.median(times), value


def bench_method(method: str, xs: list[torch.Tensor], chunk_rows: int, rounds: int) -> dict[str, float]:
    spec = get_method(method)
    n = len(xs) - 1
    shape = (xs[0].shape[0], xs[0].shape[1])
    params = working_space.params(spec, n, PARAMS)
    task = _task(method, shape, n, params, chunk_rows)
    chunks = list(row_chunks(shape, chunk_rows, seed=1234))
    bufs = ChunkBuffers()
    codes = ["BF16"] * len(xs)
    cpu = torch.device("cpu")

    def raw_of(c: ChunkInfo) -> list[torch.Tensor]:
        return [x[c.row_start : c.row_end].reshape(-1).view(torch.uint8) for x in xs]

    def load(c: ChunkInfo) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        f32 = [
            bufs.get("compute", i, x[c.row_start : c.row_end].numel(), torch.float32, cpu)
            .view(c.row_end - c.row_start, -1)
            .copy_(x[c.row_start : c.row_end])
            for i, x in enumerate(xs)
        ]
        return f32[0], f32[1:]

    def load_raw(c: ChunkInfo) -> RawChunk:
        return RawChunk(raw_of(c), codes, lambda: load(c))

    elements = shape[0] * shape[1]
    out: dict[str, list[float]] = {}
    results: dict[str, Any] = {}
    kernel = native_kernel(task, torch.float32, cpu)
    form = native_form(task, torch.float32, cpu)  # task_arithmetic: the linear kernel
    for _ in range(rounds):
        for label, lr in (("torch", None), ("native", load_raw)):
            t, stats = _median_ns(lambda lr=lr: compute_stats(spec, shape, params, n, chunks, load, load_raw=lr), 1, 1)
            out.setdefault(f"stats {label}", []).append(t / elements)
            k, f = (kernel, form) if label == "native" else (None, None)

            def merge(k: Any = k, f: Any = f, stats: Any = stats) -> bytes:
                parts = [merge_chunk(task, raw_of(c), c, torch.float32, cpu, stats, bufs, f, k) for c in chunks]
                return b"".join(bytes(p) for p in parts)

            t, data = _median_ns(merge, 1, 1)
            out.setdefault(f"merge {label}", []).append(t / elements)
            results[label] = data
    med = {k: statistics.median(v) for k, v in out.items()}
    med["same"] = float(results["torch"] == results["native"])
    return med


def torch_parts(xs: list[torch.Tensor], chunk_rows: int, rounds: int) -> dict[str, float]:
    """Per element of one model: the torch path's DARE hashing and top-k key histogram, per chunk."""
    shape = (xs[0].shape[0], xs[0].shape[1])
    c = ChunkInfo(0, chunk_rows, shape, 1234)
    delta = xs[1][:chunk_rows].float() - xs[0][:chunk_rows].float()
    n = delta.numel()
    key = stream_key(1234, 0)
    t_hash, _ = _median_ns(lambda: bernoulli_mask(key, delta, c, 0.5), rounds, n)
    keys = float_key(delta.abs())
    t_hist, _ = _median_ns(lambda: torch.bincount((keys >> 16).reshape(-1), minlength=1 << 16), rounds, n)
    t_sub, _ = _median_ns(lambda: xs[1][:chunk_rows].float() - xs[0][:chunk_rows].float(), rounds, n)
    return {"dare hash+compare": t_hash, "histogram of keys>>16": t_hist, "upcast x2 + subtract": t_sub}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--chunk-rows", type=int, default=64, help="64×4096: the CPU default chunk of 256K elements")
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--methods", default="task_arithmetic,ties,dare_ties,dare_linear,breadcrumbs,breadcrumbs_ties")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.rows, args.cols, generator=g) * 0.02
    xs = [base.bfloat16()] + [
        (base + torch.randn(args.rows, args.cols, generator=g) * 0.002).bfloat16() for _ in range(args.models)
    ]
    print(
        f"{args.rows}x{args.cols} bf16, base + {args.models} models, {args.chunk_rows}-row chunks, one thread, "
        f"median of {args.rounds}; ns per tensor element"
    )
    print(f"{'method':<18}{'stats torch':>12}{'stats nat':>11}{'merge torch':>12}{'merge nat':>11}"
          f"{'total torch':>12}{'total nat':>11}{'speedup':>9}  same bytes")  # fmt: skip
    for name in args.methods.split(","):
        m = bench_method(name, xs, args.chunk_rows, args.rounds)
        tt = m["stats torch"] + m["merge torch"]
        tn = m["stats native"] + m["merge native"]
        print(
            f"{name:<18}{m['stats torch']:>12.2f}{m['stats native']:>11.2f}{m['merge torch']:>12.2f}"
            f"{m['merge native']:>11.2f}{tt:>12.2f}{tn:>11.2f}{tt / tn:>8.1f}×  {bool(m['same'])}",
            flush=True,
        )
    print("torch path parts, per element of one model's chunk:")
    for k, v in torch_parts(xs, args.chunk_rows, args.rounds).items():
        print(f"  {k:<24}{v:>8.2f} ns")


if __name__ == "__main__":
    main()
