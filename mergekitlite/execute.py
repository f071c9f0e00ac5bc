"""Stream a plan's tensors from the inputs through the merge methods into the output shards.

Each task is cut into the row chunks the planner sized for the memory budget. A pool of workers
(one per core) each takes a chunk, reads the inputs' bytes (pread), upcasts them to the compute
dtype on the compute device, merges them with the method, casts once to the output dtype and
writes the bytes at the chunk's planned offset (pwrite). torch, pread and pwrite release the GIL,
so reading, arithmetic and writing of different chunks overlap, and only ``workers + 1`` chunks
are alive at any time. Methods with whole-tensor statistics get their statistic passes first.
The executor knows the methods' declared properties, never their maths.

Every chunk also says how many NaN/±inf values it read and wrote (``nonfinite.NonFinite``): the
native kernels count while they load and store, the torch path checks the tensors it already holds
(a reduction that is finite proves a whole tensor finite; only a tensor that fails is counted). The
executor sums them per tensor and hands each finished tensor's sum to ``ExecContext.on_nonfinite``.
"""

from __future__ import annotations

import errno
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mergekitlite.errors import MergekitliteError, MethodInputError, OutputError
from mergekitlite.gather import gather_rows
from mergekitlite.io.files import InputFiles, ShardFile
from mergekitlite.io.safetensors_header import CODE_BY_NAME, itemsize, torch_dtype
from mergekitlite.lora.rows import read_rows
from mergekitlite.methods import ChunkInfo, get_method, native
from mergekitlite.methods.apply import compute_stats
from mergekitlite.methods.linear_form import LinearForm
from mergekitlite.nonfinite import NonFinite
from mergekitlite.rounding import narrow_once
from mergekitlite.taskgraph import InputRef, Plan, RowRule, TensorTask


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
    """How to run: where to compute and how much to overlap. Passed down, never global."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Progress = field(default_factory=NullProgress)
    # Called with tensors whose bytes are written, and whether they (and all before) are fsynced;
    # the resume journal records them (see output.py).
    on_done: Callable[[list[str], bool], None] | None = None
    journal_every_s: float = 1.0
    sync_every_bytes: int = 1 << 30
    # Linear methods on the CPU run in the fused native kernel when it is built (same bits).
    native: bool = True
    # Called (before on_done names it) with each finished tensor that read or wrote NaN/±inf.
    on_nonfinite: Callable[[str, NonFinite], None] | None = None


# A chunk's output bytes and the NaN/±inf it read and wrote.
Merged = tuple[memoryview, NonFinite]


def resolve_device(name: str) -> torch.device:
    """A torch device from --device; ``auto`` is the first GPU when one is visible, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise MergekitliteError(f"--device {name!r}: not a device (expected cpu, cuda, cuda:N, mps or auto)") from None
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
    info: ChunkInfo  # output rows [row_start, row_end)
    rule: RowRule | None = None  # set for rows produced by a row rule instead of the method
    last: bool = False  # the task's final chunk


def task_chunks(task: TensorTask) -> list[ChunkInfo]:
    """Chunks of the rows the method merges; their ``shape`` is that of the merged part."""
    rows = task.merged_rows
    shape = (rows, *task.shape[1:]) if task.shape else ()
    if math.prod(shape) == 0:
        return [ChunkInfo(0, rows, shape, task.seed)] if rows == task.rows else []
    step = max(1, task.chunk_rows)
    return [ChunkInfo(s, min(rows, s + step), shape, task.seed) for s in range(0, rows, step)]


def _task_parts(task: TensorTask, shard: str) -> list[_Chunk]:
    parts = [_Chunk(task, shard, info) for info in task_chunks(task)]
    step = max(1, task.chunk_rows)
    for rule in task.row_rules:
        parts += [
            _Chunk(task, shard, ChunkInfo(s, min(rule.end, s + step), task.shape, task.seed), rule)
            for s in range(rule.start, rule.end, step)
        ]
    if parts:
        parts[-1] = _Chunk(parts[-1].task, shard, parts[-1].info, parts[-1].rule, last=True)
    return parts


def _row_bytes(code: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) * itemsize(code) if shape else itemsize(code)


class ChunkBuffers:
    """One worker's reusable buffers: the raw input bytes, their compute-dtype copies and the
    output bytes of the chunk it is working on. Reusing them instead of allocating per chunk
    saves the page faults and zero-filling of fresh memory (measured ~30% of the CPU time of
    task_arithmetic on bf16 inputs). Only the chunk being merged uses them, so nothing outlives it."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, int, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, slot: str, index: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (slot, index, dtype, device)
        buf = self._store.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._store[key] = buf
        return buf[:numel]


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _read_rows(
    files: InputFiles, refs: tuple[InputRef, ...], first_row: int, rows: int, bufs: ChunkBuffers | None
) -> list[torch.Tensor]:
    """The rows of each input as uint8 tensors (in ``bufs`` when given)."""
    out = []
    for i, ref in enumerate(refs):
        rb = ref.tensor.row_bytes
        n = rows * rb
        if bufs is None:
            raw = torch.empty(n, dtype=torch.uint8)
        else:
            raw = bufs.get("raw", i, n, torch.uint8, torch.device("cpu"))
        if n and ref.rows is not None:
            gather_rows(files, ref.rows, first_row, rows, _bytes_view(raw))
        elif n:  # as stored, or computed on read for a model+adapter input
            read_rows(files, ref.tensor, first_row, rows, _bytes_view(raw), bufs)
        out.append(raw)
    return out


def read_chunk(
    files: InputFiles, task: TensorTask, info: ChunkInfo, bufs: ChunkBuffers | None = None
) -> list[torch.Tensor]:
    return _read_rows(files, task.inputs, info.row_start, info.row_end - info.row_start, bufs)


def _read_part(files: InputFiles, chunk: _Chunk, bufs: ChunkBuffers | None) -> list[torch.Tensor]:
    rule = chunk.rule
    if rule is None:
        return read_chunk(files, chunk.task, chunk.info, bufs)
    offset = (rule.src_start if rule.src_start is not None else rule.start) - rule.start
    rows = chunk.info.row_end - chunk.info.row_start
    return _read_rows(files, rule.sources, chunk.info.row_start + offset, rows, bufs)


def _typed(raw: torch.Tensor, code: str, shape: tuple[int, ...]) -> torch.Tensor:
    return raw.view(torch_dtype(code)).view(shape)


def count_nonfinite(t: torch.Tensor) -> int:
    """NaN and ±inf values in ``t``. A finite sum proves every value finite (NaN and inf propagate
    through additions): one reduction in the tensor's own dtype, no temporary, in the common case.
    float16 sums overflow too often to be a test; its minimum and maximum are (min/max propagate
    NaN). The values are counted only when the test fails. (A float32 sum of a 16-bit tensor
    converts it first: that cost 4× the torch path's time per chunk.)"""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    if t.dtype == torch.float16:
        finite = bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())
    else:
        finite = bool(torch.isfinite(t.sum()))
    return 0 if finite else t.numel() - int(torch.isfinite(t).sum())


def _count_inputs(tensors: list[torch.Tensor], refs: tuple[InputRef, ...]) -> NonFinite:
    """NaN/±inf among the values read, per input model (counted in the inputs' own dtypes)."""
    return NonFinite.from_kernel(([count_nonfinite(t) for t in tensors], 0, 0), [r.model for r in refs])


def _output_counts(result: torch.Tensor, out: torch.Tensor) -> NonFinite:
    """NaN/±inf in ``out`` (the cast of ``result``), and how many of them ``result`` held finite."""
    bad = count_nonfinite(out)
    if not bad:
        return NonFinite()
    overflow = ~torch.isfinite(out.view(result.shape)) & torch.isfinite(result).cpu()
    return NonFinite(outputs=bad, overflow=int(overflow.sum()))


def _to_output(result: torch.Tensor, code: str, bufs: ChunkBuffers | None) -> Merged:
    """Cast once to the output dtype, on the host, as bytes; with the NaN/±inf the cast left."""
    dtype = torch_dtype(code)
    narrowed = narrow_once(result, dtype) if result.dtype == torch.float64 else result
    if bufs is None:
        out = narrowed.to(dtype=dtype, device="cpu").contiguous().reshape(-1)
    else:
        out = bufs.get("out", 0, result.numel(), dtype, torch.device("cpu"))
        out.view(result.shape).copy_(narrowed)
    return _bytes_view(out), _output_counts(result, out)


def _passed_through(raw: torch.Tensor, ref: InputRef, shape: tuple[int, ...]) -> Merged:
    """An input's bytes as the output's: what it holds, it writes."""
    found = count_nonfinite(_typed(raw, ref.tensor.dtype, shape))
    return _bytes_view(raw), NonFinite(found, found, 0, {ref.model: found} if found else {})


def apply_rule(
    task: TensorTask,
    rule: RowRule,
    raw: list[torch.Tensor],
    rows: int,
    compute: torch.dtype,
    bufs: ChunkBuffers | None = None,
) -> Merged:
    """Rows set by a row rule: a zero row, a row taken from a model, or the mean of models' rows."""
    shape = (rows, *task.shape[1:])
    if rule.kind == "zero":
        return _bytes_view(torch.zeros(shape, dtype=torch_dtype(task.out_dtype)).reshape(-1)), NonFinite()
    if rule.kind == "take" and rule.sources[0].tensor.dtype == task.out_dtype:
        return _passed_through(raw[0], rule.sources[0], shape)
    tensors = [_typed(buf, ref.tensor.dtype, shape) for buf, ref in zip(raw, rule.sources)]
    read = _count_inputs(tensors, rule.sources)
    if rule.kind == "take":
        result = tensors[0].to(compute)
    elif rule.kind == "mean":
        result = tensors[0].to(compute)
        for t in tensors[1:]:
            result.add_(t.to(compute))
        result.div_(len(tensors))
    else:  # pragma: no cover - the planner only makes the kinds above
        raise ValueError(f"unknown row rule {rule.kind!r}")
    data, written = _to_output(result, task.out_dtype, bufs)
    return data, read + written


def to_compute(
    task: TensorTask,
    raw: list[torch.Tensor],
    info: ChunkInfo,
    compute: torch.dtype,
    device: torch.device,
    bufs: ChunkBuffers | None = None,
    found: list[int] | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Input bytes → (base, models) tensors in the compute dtype on the compute device. ``found``:
    append each input's NaN/±inf count, taken while the copy is still in the cache."""
    rows = info.row_end - info.row_start
    shape = (rows, *task.shape[1:]) if task.shape else ()
    tensors = []
    for i, (buf, ref) in enumerate(zip(raw, task.inputs)):
        src = _typed(buf, ref.tensor.dtype, shape)
        if bufs is None:
            dst = src.to(device=device, dtype=compute)
        else:
            dst = bufs.get("compute", i, src.numel(), compute, device).view(shape).copy_(src)
        tensors.append(dst)
        if found is not None:
            # A widening copy holds the same NaN/±inf; a narrowing one may overflow: count the source.
            exact = dst.dtype.itemsize >= src.dtype.itemsize and dst.dtype in (torch.float32, torch.float64)
            found.append(count_nonfinite(dst if exact else src))
    if task.base is not None:
        return tensors[0], tensors[1:]
    return None, tensors


def native_form(task: TensorTask, compute: torch.dtype, device: torch.device) -> LinearForm | None:
    """The form to hand to the native kernel for ``task``, or None when the torch path must run it."""
    if task.copy_of is not None or device.type != "cpu" or compute != torch.float32:
        return None
    if not native.supports([ref.tensor.dtype for ref in task.inputs], task.out_dtype):
        return None
    return get_method(task.method).form(task.base is not None, len(task.models), task.param_dict)


def merge_chunk(
    task: TensorTask,
    raw: list[torch.Tensor],
    info: ChunkInfo,
    compute: torch.dtype,
    device: torch.device,
    stats: Any = None,
    bufs: ChunkBuffers | None = None,
    form: LinearForm | None = None,
) -> Merged:
    """Merge one row chunk: raw input bytes in, raw output bytes out, and the NaN/±inf read and
    written. With a ``form`` (see ``native_form``) the native kernel computes it, else the method's
    torch function."""
    rows = info.row_end - info.row_start
    shape = (rows, *task.shape[1:]) if task.shape else ()
    if task.copy_of is not None:
        return _passed_through(raw[0], task.copy_of, shape)
    if rows == 0 or math.prod(task.shape) == 0:
        return memoryview(b""), NonFinite()
    if form is not None:
        nbytes = rows * _row_bytes(task.out_dtype, task.shape)
        cpu = torch.device("cpu")
        out = torch.empty(nbytes, dtype=torch.uint8) if bufs is None else bufs.get("out", 0, nbytes, torch.uint8, cpu)
        found = native.run_linear(form, raw, [ref.tensor.dtype for ref in task.inputs], out, task.out_dtype)
        return _bytes_view(out), NonFinite.from_kernel(found, [ref.model for ref in task.inputs])
    counts: list[int] = []
    base, models = to_compute(task, raw, info, compute, device, bufs, counts)
    read = NonFinite.from_kernel((counts, 0, 0), [ref.model for ref in task.inputs])
    with _naming_the_tensor(task):
        result = get_method(task.method)(base, models, task.param_dict, chunk=info, stats=stats)
    if result.shape != torch.Size(shape):
        raise RuntimeError(f"{task.method} returned shape {list(result.shape)} for a {list(shape)} chunk")
    data, written = _to_output(result, task.out_dtype, bufs)
    return data, read + written


def task_stats(
    files: InputFiles,
    task: TensorTask,
    compute: torch.dtype,
    device: torch.device,
    pool: ThreadPoolExecutor | None = None,
    lookahead: int = 2,
) -> Any:
    """Run the statistic passes of ``task``'s method. Chunks are re-read for every pass (from the
    page cache, cheaper than holding the tensor); with a ``pool``, the next chunks are read and
    converted by the workers while this thread updates the statistic."""
    spec = get_method(task.method)
    if spec.statistic is None or math.prod(task.shape) == 0:
        return None
    infos = task_chunks(task)
    index = {info.row_start: i for i, info in enumerate(infos)}
    pending: dict[int, Future[tuple[torch.Tensor | None, list[torch.Tensor]]]] = {}
    concurrent = pool is not None and getattr(spec.statistic, "concurrent", False)

    def fetch(i: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        return to_compute(task, read_chunk(files, task, infos[i]), infos[i], compute, device)

    def load(info: ChunkInfo) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        i = index[info.row_start]
        if pool is None or concurrent:  # concurrent: already on a worker, which reads its own chunk
            return fetch(i)
        for j in range(i, min(len(infos), i + lookahead + 1)):
            if j not in pending:
                pending[j] = pool.submit(fetch, j)
        return pending.pop(i).result()

    shape = (task.merged_rows, *task.shape[1:]) if task.shape else ()
    with _naming_the_tensor(task):
        return compute_stats(
            spec, shape, task.param_dict, len(task.models), infos, load, pool if concurrent else None, lookahead + 1
        )


@contextmanager
def _naming_the_tensor(task: TensorTask) -> Iterator[None]:
    """A method's arithmetic knows no tensor names: say which tensor its inputs failed on."""
    try:
        yield
    except MethodInputError as exc:
        raise MethodInputError(f"tensor {task.name}: {exc}") from None


def run_tasks(plan: Plan, out_dir: Path, ctx: ExecContext, done: set[str] | None = None) -> int:
    """Write every task not in ``done`` into the shard files in ``out_dir``. Returns tensors merged."""
    done = set(done or ())
    todo = [t for t in plan.tasks if t.name not in done]
    total = sum(t.nbytes + sum((r.end - r.start) * _row_bytes(t.out_dtype, t.shape) for r in t.row_rules) for t in todo)
    ctx.progress.start(total, len(todo))
    shards: dict[str, ShardFile] = {}
    threads = torch.get_num_threads()
    # Workers each run single-threaded torch ops on their own chunk (see budget.default_workers).
    torch.set_num_threads(1)
    try:
        for layout in plan.shards:
            shards[layout.filename] = ShardFile(out_dir / layout.filename, layout, reuse=bool(done))
        return _pipeline(plan, todo, shards, ctx)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"the disk is full ({exc.strerror}) while writing {out_dir}; nothing named like the final output "
                "exists. Free some space and run again with --resume to continue."
            ) from None
        raise
    finally:
        torch.set_num_threads(threads)
        for s in shards.values():
            s.close()


def _process(
    files: InputFiles,
    shards: dict[str, ShardFile],
    chunk: _Chunk,
    compute: torch.dtype,
    device: torch.device,
    stats: Any,
    local: threading.local,
    form: LinearForm | None,
) -> tuple[int, NonFinite]:
    """One worker's job: read a chunk's inputs, merge (or apply the row rule), write the result.
    Returns the bytes written and the NaN/±inf met."""
    bufs = local.__dict__.setdefault("buffers", ChunkBuffers())
    raw = _read_part(files, chunk, bufs)
    rows = chunk.info.row_end - chunk.info.row_start
    task = chunk.task
    if chunk.rule is not None:
        data, found = apply_rule(task, chunk.rule, raw, rows, compute, bufs)
    else:
        data, found = merge_chunk(task, raw, chunk.info, compute, device, stats, bufs, form)
    shards[chunk.shard].write(task.name, chunk.info.row_start * _row_bytes(task.out_dtype, task.shape), data)
    return len(data), found


def _pipeline(plan: Plan, todo: list[TensorTask], shards: dict[str, ShardFile], ctx: ExecContext) -> int:
    compute = torch_dtype(CODE_BY_NAME[plan.compute_dtype])
    merged = 0
    finished: list[str] = []
    unsynced = 0
    remaining: dict[str, int] = {}
    inflight: deque[tuple[_Chunk, Future[tuple[int, NonFinite]]]] = deque()
    tally: dict[str, NonFinite] = {}  # NaN/±inf of the tensors in flight, summed over their chunks
    limit = plan.budget.inflight
    last_journal = [time.monotonic()]
    local = threading.local()  # each worker's ChunkBuffers

    with InputFiles() as files, ThreadPoolExecutor(plan.budget.workers, "mkl-chunk") as pool:

        def complete_oldest() -> None:
            nonlocal merged, unsynced
            chunk, fut = inflight.popleft()
            nbytes, found = fut.result()
            ctx.progress.advance(nbytes)
            unsynced += nbytes
            name = chunk.task.name
            if found:
                tally[name] = tally[name] + found if name in tally else found
            remaining[name] -= 1
            if remaining[name] == 0:
                total = tally.pop(name, None)
                if total is not None and ctx.on_nonfinite is not None:
                    ctx.on_nonfinite(name, total)
                merged += 1
                finished.append(chunk.task.name)
                ctx.progress.tensor_done(chunk.task.name)
            journal(final=False)

        def journal(final: bool) -> None:
            """Record finished tensors about every second; fsync every ``sync_every_bytes`` and at
            the end, so that the finished output is on disk before it is renamed into place."""
            nonlocal unsynced
            sync = final or (unsynced >= ctx.sync_every_bytes and bool(finished))
            if sync:
                for s in shards.values():
                    s.sync()
                unsynced = 0
            if ctx.on_done is None or not (finished or sync):
                return
            if sync or time.monotonic() - last_journal[0] >= ctx.journal_every_s:
                ctx.on_done(list(finished), sync)
                finished.clear()
                last_journal[0] = time.monotonic()

        try:
            for task in todo:
                parts = _task_parts(task, plan.shard_of[task.name])
                remaining[task.name] = len(parts)
                stats = None
                if get_method(task.method).statistic is not None and task.copy_of is None:
                    # The statistic passes use every worker: let the previous task's chunks land
                    # first, so that two tasks' working sets never overlap (the budget counts one).
                    while inflight:
                        complete_oldest()
                    stats = task_stats(files, task, compute, ctx.device, pool, lookahead=plan.budget.workers)
                form = native_form(task, compute, ctx.device) if ctx.native else None
                rule = None
                for chunk in parts:
                    if chunk.rule is not rule:
                        # Row rules overwrite rows the merge (or an earlier rule) wrote: everything
                        # before a rule must have landed before its first chunk is written.
                        while inflight:
                            complete_oldest()
                        rule = chunk.rule
                    while len(inflight) >= limit:
                        complete_oldest()
                    job = pool.submit(_process, files, shards, chunk, compute, ctx.device, stats, local, form)
                    inflight.append((chunk, job))
                if not parts:  # an empty tensor: its header entry is all there is
                    remaining[task.name] = 1
                    inflight.append((_Chunk(task, plan.shard_of[task.name], ChunkInfo(0, 0, task.shape, 0)), _done(0)))
            while inflight:
                complete_oldest()
            journal(final=True)
        finally:
            for _, f in inflight:
                f.cancel()
    return merged


def _done(value: int) -> Future[tuple[int, NonFinite]]:
    fut: Future[tuple[int, NonFinite]] = Future()
    fut.set_result((value, NonFinite()))
    return fut
