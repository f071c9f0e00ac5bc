"""Stream a plan's tensors from the inputs through the merge methods into the output shards.

Work is cut into row chunks of about ``plan.chunk_elements`` elements. For each chunk the inputs'
bytes are read (read-ahead threads), upcast to the compute dtype, merged by the method, cast once
to the output dtype and written at the chunk's planned offset (a writer thread). Only a few
chunks are alive at any time, so memory does not grow with the model. The executor knows the
method's declared properties, never its maths.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from mergekitlite.io.files import InputFiles, ShardFile
from mergekitlite.io.safetensors_header import CODE_BY_NAME, itemsize, torch_dtype
from mergekitlite.methods import get_method
from mergekitlite.plan import Plan, TensorTask


class Progress(Protocol):
    """What the executor reports; the CLI renders it, tests may record it."""

    def start(self, total_bytes: int, total_tensors: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def tensor_done(self, name: str) -> None: ...


class NullProgress:
    def start(self, total_bytes: int, total_tensors: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def tensor_done(self, name: str) -> None:
        pass


@dataclass(frozen=True)
class ExecContext:
    """How to run: where to compute and how much to overlap. No global state: passed down."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    read_ahead: int = 4  # chunks read before they are needed
    write_behind: int = 4  # chunks queued for writing
    progress: Progress = field(default_factory=NullProgress)
    # Called after each completed tensor with the tensors finished so far; used for the resume
    # journal. Data is synced to disk before the callback runs.
    on_durable: Callable[[list[str]], None] | None = None
    sync_every_bytes: int = 512 * 1024 * 1024


def resolve_device(name: str) -> torch.device:
    from mergekitlite.errors import MergekitliteError

    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise MergekitliteError(f"--device {name}: no CUDA device is visible (torch {torch.__version__} is {built})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise MergekitliteError(f"--device {name}: MPS is not available on this machine")
    return dev


@dataclass(frozen=True)
class _Chunk:
    task: TensorTask
    shard: str
    row_start: int
    row_end: int
    rows_total: int

    @property
    def last(self) -> bool:
        return self.row_end >= self.rows_total


def _chunks(plan: Plan, skip: set[str]) -> Iterator[_Chunk]:
    for task in plan.tasks:
        if task.name in skip:
            continue
        rows_total = task.shape[0] if task.shape else 1
        if rows_total == 0 or math.prod(task.shape) == 0:
            yield _Chunk(task, plan.shard_of[task.name], 0, 0, 0)
            continue
        step = task.rows_per_chunk(plan.chunk_elements)
        for start in range(0, rows_total, step):
            yield _Chunk(task, plan.shard_of[task.name], start, min(rows_total, start + step), rows_total)


def _row_bytes(code: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) * itemsize(code) if shape else itemsize(code)


def _read(files: InputFiles, chunk: _Chunk) -> list[bytearray]:
    out = []
    for ref in chunk.task.inputs:
        rb = _row_bytes(ref.tensor.dtype, ref.tensor.shape)
        out.append(files.read(ref.tensor, chunk.row_start * rb, (chunk.row_end - chunk.row_start) * rb))
    return out


def merge_chunk(task: TensorTask, raw: list[bytearray], rows: int, compute: torch.dtype, device: torch.device) -> memoryview:
    """Merge one row chunk: raw input bytes in, raw output bytes out."""
    if task.copy_of is not None:
        return memoryview(raw[0])
    if rows == 0 or math.prod(task.shape) == 0:
        return memoryview(b"")
    chunk_shape = (rows, *task.shape[1:]) if task.shape else ()
    tensors = [
        torch.frombuffer(buf, dtype=torch_dtype(ref.tensor.dtype)).view(chunk_shape).to(device=device, dtype=compute)
        for buf, ref in zip(raw, task.inputs)
    ]
    base = tensors[0] if task.base is not None else None
    models = tensors[1:] if task.base is not None else tensors
    result = get_method(task.method)(base, models, task.param_dict)
    if result.shape != torch.Size(chunk_shape):
        raise RuntimeError(f"{task.method} returned shape {list(result.shape)} for a {list(chunk_shape)} chunk")
    out = result.to(dtype=torch_dtype(task.out_dtype)).to("cpu").contiguous()
    return memoryview(out.view(torch.uint8).numpy()).cast("B")


def run_tasks(plan: Plan, out_dir: Path, ctx: ExecContext, done: set[str] | None = None) -> int:
    """Write every task not in ``done`` into the shard files in ``out_dir``. Returns tensors merged."""
    done = set(done or ())
    compute = torch_dtype(CODE_BY_NAME[plan.compute_dtype])
    total = sum(t.nbytes for t in plan.tasks if t.name not in done)
    ctx.progress.start(total, sum(1 for t in plan.tasks if t.name not in done))
    shards = {
        layout.filename: ShardFile(out_dir / layout.filename, layout, reuse=bool(done))
        for layout in plan.shards
    }
    try:
        return _pipeline(plan, shards, ctx, done, compute)
    finally:
        for s in shards.values():
            s.close()


def _pipeline(
    plan: Plan, shards: dict[str, ShardFile], ctx: ExecContext, done: set[str], compute: torch.dtype
) -> int:
    merged = 0
    finished: list[str] = []
    unsynced = 0
    with InputFiles() as files, ThreadPoolExecutor(2, "mkl-read") as readers, ThreadPoolExecutor(1, "mkl-write") as writer:
        pending_reads: deque[tuple[_Chunk, Future[list[bytearray]]]] = deque()
        pending_writes: deque[tuple[_Chunk, Future[None]]] = deque()
        chunks = _chunks(plan, done)

        def fill() -> None:
            while len(pending_reads) < ctx.read_ahead:
                c = next(chunks, None)
                if c is None:
                    return
                pending_reads.append((c, readers.submit(_read, files, c)))

        def retire(limit: int) -> None:
            nonlocal merged, unsynced
            while len(pending_writes) > limit:
                c, fut = pending_writes.popleft()
                fut.result()
                if c.last:
                    merged += 1
                    finished.append(c.task.name)
                    ctx.progress.tensor_done(c.task.name)
            if ctx.on_durable and finished and (unsynced >= ctx.sync_every_bytes or limit == 0):
                for s in shards.values():
                    s.sync()
                ctx.on_durable(list(finished))
                finished.clear()
                unsynced = 0

        try:
            fill()
            while pending_reads:
                chunk, fut = pending_reads.popleft()
                raw = fut.result()
                fill()
                data = merge_chunk(chunk.task, raw, chunk.row_end - chunk.row_start, compute, ctx.device)
                start = chunk.row_start * _row_bytes(chunk.task.out_dtype, chunk.task.shape)
                shard = shards[chunk.shard]
                pending_writes.append((chunk, writer.submit(shard.write, chunk.task.name, start, data)))
                unsynced += len(data)
                ctx.progress.advance(len(data))
                retire(ctx.write_behind)
            retire(0)
        finally:
            for _, f in pending_reads:
                f.cancel()
    return merged

