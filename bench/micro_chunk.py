"""Micro-benchmark of the per-chunk arithmetic of a bf16 task_arithmetic merge, by chunk size.

No I/O: three bf16 "models" of ``--elements`` values sit in memory and are streamed through in
chunks, as one of ``merge``'s chunk workers does (single-threaded torch ops): upcast to float32,
Σ wᵢ(mᵢ − base) + base, cast once to bf16. It answers two questions from the profile of a real
merge: how much the chunk size matters (L2/L3-resident intermediates vs DRAM streaming), and
what the multiplications by a weight of exactly 1.0 cost. mergekit's bf16 formulation is timed
for reference.

    python bench/micro_chunk.py --elements 64M --chunks 64K,256K,1M,4M
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import harness
import torch

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def current(b: torch.Tensor, m0: torch.Tensor, m1: torch.Tensor) -> torch.Tensor:
    """What merge does today: upcast each input, (m − base)·w per model, add base, cast once."""
    base, x0, x1 = (t.to(torch.float32) for t in (b, m0, m1))
    total = (x0 - base).mul_(1.0)
    total.add_((x1 - base).mul_(1.0))
    return total.add_(base).to(torch.bfloat16)


def skip_unit_weights(b: torch.Tensor, m0: torch.Tensor, m1: torch.Tensor) -> torch.Tensor:
    """Same operations and rounding, without the two multiplications by 1.0."""
    base, x0, x1 = (t.to(torch.float32) for t in (b, m0, m1))
    total = x0 - base
    total.add_(x1 - base)
    return total.add_(base).to(torch.bfloat16)


def mergekit_like(b: torch.Tensor, m0: torch.Tensor, m1: torch.Tensor) -> torch.Tensor:
    """bf16 throughout, stacked deltas summed, as mergekit's task arithmetic does (different rounding)."""
    deltas = torch.stack([m0 - b, m1 - b]) * torch.tensor([1.0, 1.0], dtype=torch.bfloat16).view(2, 1)
    return (b + deltas.sum(dim=0)).to(torch.bfloat16)


KERNELS: dict[str, Kernel] = {"current": current, "skip w=1": skip_unit_weights, "mergekit-like bf16": mergekit_like}


def run(kernel: Kernel, inputs: list[torch.Tensor], chunk: int) -> float:
    """Seconds to stream every element of ``inputs`` through ``kernel`` in ``chunk``-element pieces."""
    n = inputs[0].numel()
    out = torch.empty(n, dtype=torch.bfloat16)
    started = time.perf_counter()
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        out[start:end] = kernel(*(t[start:end] for t in inputs))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", default="64M", help="values per model (e.g. 64M)")
    ap.add_argument("--chunks", default="64K,256K,1M,4M", help="chunk sizes in elements")
    ap.add_argument("--repeats", type=int, default=3, help="best of N per cell (the CPUs are shared)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (merge's chunk workers use 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = harness.count(args.elements)
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
    inputs = [base, *((base.float() + torch.randn(n, generator=gen) * 0.001).to(torch.bfloat16) for _ in range(2))]
    chunks = [harness.count(c) for c in args.chunks.split(",")]
    print(
        f"{n / 1e6:.0f}M elements per model, torch threads {args.threads}, best of {args.repeats} interleaved "
        "rounds; ns per element:"
    )
    best: dict[tuple[int, str], float] = {}
    # Every cell once per round, rounds repeated: load from other users hits all cells alike.
    for _ in range(args.repeats):
        for chunk in chunks:
            for name, kernel in KERNELS.items():
                t = run(kernel, inputs, chunk)
                best[chunk, name] = min(best.get((chunk, name), t), t)
    print(f"{'chunk':>8} " + " ".join(f"{k:>20}" for k in KERNELS))
    for chunk in chunks:
        print(f"{chunk:>8} " + " ".join(f"{best[chunk, k] / n * 1e9:20.2f}" for k in KERNELS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
