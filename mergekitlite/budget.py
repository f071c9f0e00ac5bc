"""Memory budgets: what the machine has, what one chunk of a task costs, how many rows fit.

The executor runs ``workers`` chunks at once (each worker reads, merges and writes one chunk) and
keeps one more queued, so a task's working set is ``workers + 1`` chunks, each holding its raw
input bytes, their compute-dtype copies and temporaries (on the compute device) and its output
bytes. The planner picks each task's rows per chunk so that this stays inside the budget, and
cache-sized, because that is where float32 arithmetic is fastest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from mergekitlite.errors import PlanError

QUEUED = 1  # chunks submitted beyond the busy workers, so that no worker waits for work
# Resident size of the interpreter with torch, safetensors and pydantic imported, before any
# tensor exists (measured: ~310 MB with torch 2.13 CPU); the budget for chunks is what is left.
BASELINE_RSS = 400 * 1000**2
# Cache-sized chunks: float32 arithmetic through small reusable buffers was measured 5x faster
# than over whole tensors, and per element 4.8 ns at 256K elements vs 5.1 ns at 1M and 16 ns at 4M
# (bench/micro_chunk.py; the cores here have 2 MiB of cache each).
CACHE_CHUNK_ELEMENTS = 1 << 18
GPU_CHUNK_ELEMENTS = 1 << 24
# Without an explicit --max-ram, chunks may hold this share of the available memory.
DEFAULT_RAM_SHARE = 0.25
# Share of --max-vram the per-chunk model may fill. The rest is for device transients it does not
# count: cross-device dtype conversion buffers, the int64 hashing of random methods, allocator rounding.
# Measured on an H200 with every statistic family at --max-vram 2GB (bench/gpu_check.py): up to 13% over
# the budget with no headroom (dare_ties, della, slerp), while the CPU-measured working space per
# method (tests/test_working_set.py) was inside its declaration.
GPU_HEADROOM = 0.85


@dataclass(frozen=True)
class Budget:
    ram: int | None = None  # bytes the whole process may use; None: derive from the machine
    vram: int | None = None  # bytes of device memory for chunks (when computing on a GPU)
    on_gpu: bool = False
    workers: int = field(default_factory=lambda: default_workers())

    @property
    def inflight(self) -> int:
        return self.workers + QUEUED

    def chunk_ram(self) -> int:
        """Bytes available for the host-side chunks of one task (all in-flight chunks together)."""
        if self.ram is not None:
            return self.ram - BASELINE_RSS
        return int(available_ram() * DEFAULT_RAM_SHARE)

    def chunk_vram(self) -> int | None:
        if not self.on_gpu:
            return None
        if self.vram is not None:
            return int(self.vram * GPU_HEADROOM)
        free = available_vram()
        return int(free * 0.8 * GPU_HEADROOM) if free else None


def default_workers() -> int:
    """One chunk worker per core: each runs single-threaded torch ops on its own chunk, which on
    small chunks beats one chunk on many intra-op threads (no spin-waiting thread pools)."""
    return max(2, os.cpu_count() or 2)


def available_ram() -> int:
    """Memory available to a new allocation now (MemAvailable), falling back to physical RAM."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_vram() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            return int(free)
    except Exception:  # pragma: no cover - driver problems surface later with a clearer error
        return None
    return None


@dataclass(frozen=True)
class RowCost:
    """Bytes one row of one chunk costs while a worker merges it (see the module docstring)."""

    raw: int  # input bytes as stored
    work: int  # compute-dtype copies of the inputs and two temporaries
    out: int  # output bytes
    on_gpu: bool
    produced: int = 0  # host working bytes of inputs produced on read (LoRA: lora/rows.py), per row
    fixed: int = 0  # host bytes per chunk whatever its rows (LoRA: the factor every row needs whole)

    @property
    def host(self) -> int:
        return self.produced + (self.raw + self.out if self.on_gpu else self.raw + self.work + self.out)

    @property
    def device(self) -> int:
        return self.work if self.on_gpu else 0


def row_cost(
    input_row_bytes: list[int],
    row_elements: int,
    out_row_bytes: int,
    compute_bytes: int,
    on_gpu: bool,
    temporaries: int = 2,
    produced: int = 0,
    fixed: int = 0,
) -> RowCost:
    """``temporaries``: compute-dtype arrays of the chunk's size the method holds besides its inputs
    (a method's declared working space, see MethodSpec.temporaries); ``produced``, ``fixed``: see RowCost."""
    work = row_elements * compute_bytes * (len(input_row_bytes) + temporaries)
    return RowCost(sum(input_row_bytes), work, out_row_bytes, on_gpu, produced, fixed)


def rows_per_chunk(
    rows: int,
    row_elements: int,
    cost: RowCost,
    budget: Budget,
    *,
    name: str,
) -> int:
    """Rows per chunk for a task: cache-sized (never over budget). Methods with whole-tensor
    statistics are exact for any chunking by contract, and re-reading a chunk from the page cache
    for each pass costs less than streaming whole-tensor temporaries through memory (measured
    2.5-4x faster for ties, dare, breadcrumbs, slerp on 2048x2048 tensors)."""
    if budget.ram is not None and budget.chunk_ram() <= 0:
        raise PlanError(
            [
                f"--max-ram {human(budget.ram)} is below the ~{human(BASELINE_RSS)} the interpreter and torch need "
                "before any tensor is loaded"
            ]
        )
    host_cap = (budget.chunk_ram() - budget.inflight * cost.fixed) // (budget.inflight * max(cost.host, 1))
    vram = budget.chunk_vram()
    dev_cap = vram // (budget.workers * max(cost.device, 1)) if (vram is not None and cost.device) else max(rows, 1)
    fit = min(host_cap, dev_cap)
    if fit < 1:
        need = budget.inflight * (cost.host + cost.fixed) + BASELINE_RSS
        raise PlanError(
            [
                f"cannot fit {name!r} in the memory budget: one row needs {need / 1e6:.1f} MB of RAM "
                f"(with {BASELINE_RSS / 1e6:.0f} MB for the interpreter and torch); raise --max-ram"
                + (" or --max-vram" if budget.on_gpu else "")
            ]
        )
    target = GPU_CHUNK_ELEMENTS if budget.on_gpu else CACHE_CHUNK_ELEMENTS
    want = max(1, target // max(row_elements, 1))
    return max(1, min(rows, want, fit))


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '2e9' → bytes. mergekit's '5B' (five billion) is accepted too."""
    try:
        return int(float(text))
    except ValueError:
        pass
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", text, re.IGNORECASE)
    if not m or (not m[2] and m[3]):
        raise ValueError(f"not a size: {text!r} (expected e.g. 5GB, 500MB, 2GiB)")
    value, prefix, binary, b = float(m[1]), m[2].lower(), bool(m[3]), bool(m[4])
    if not prefix and b:  # mergekit: "5B" is five billion bytes
        return int(value * 10**9)
    power = " kmgt".index(prefix) if prefix else 0
    return int(value * (1024 if binary else 1000) ** power)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover
