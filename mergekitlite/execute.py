"""Stream a plan's tensors from the inputs through the merge methods into the output shards.

Each task is cut into the row chunks the planner sized for the memory budget. A pool of workers
(one per core) each takes a chunk, reads the inputs' bytes (pread), upcasts them to the compute
dtype on the compute device, merges them with the method, casts once to the output dtype and
writes the bytes at the chunk's planned offset (pwrite). torch, pread and pwrite release the GIL,
so reading, arithmetic and writing of different chunks overlap, and only ``workers + 1`` chunks
are alive at any time. Methods with whole-tensor statistics get their statistic passes first.
The executor knows the methods' declared properties, never their maths.

torch is imported only when a chunk needs it: a merge whose tensors are all copies, raw takes or linear
forms for the native kernel reads into numpy byte buffers and never imports it (about a second of start-up).

Every chunk also says how many NaN/±inf values it read and wrote (``nonfinite.NonFinite``): the
native kernels count while they load and store, the torch path checks the tensors it already holds
(a reduction that is finite proves a whole tensor finite; only a tensor that fails is counted), and
bytes passed through as they are (copies, raw takes) are checked with numpy. The executor sums them
per tensor and hands each finished tensor's sum to ``ExecContext.on_nonfinite``.
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
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mergekitlite.errors import MergekitliteError, MethodInputError, OutputError
from mergekitlite.heap import retained_heap
from mergekitlite.io.files import InputFiles, ShardFile
from mergekitlite.io.safetensors_header import CODE_BY_NAME, itemsize, torch_dtype
from mergekitlite.lora.tensor import AdaptedTensor
from mergekitlite.methods import ChunkInfo, get_method, native
from mergekitlite.methods.linear_form import LinearForm
from mergekitlite.methods.registry import NativeMerge
from mergekitlite.nonfinite import NonFinite
from mergekitlite.taskgraph import InputRef, Plan, RowRule, TensorTask

if TYPE_CHECKING:
    import torch


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

    device: Any = "cpu"  # a torch.device, or a name ("cpu" needs no torch: see merge_device)
    progress: Progress = field(default_factory=NullProgress)
    # Called with tensors whose bytes are written, and whether they (and all before) are fsynced;
    # the resume journal records them (see output.py).
    on_done: Callable[[list[str], bool], None] | None = None
    journal_every_s: float = 1.0
    sync_every_bytes: int = 1 << 30
    # Methods with a native kernel (linear forms, TIES/DARE/Breadcrumbs; native statistics) run in it on the
    # CPU when it is built (same bits); False (--no-native): the torch path everywhere, statistics included.
    native: bool = True
    # Called (before on_done names it) with each finished tensor that read or wrote NaN/±inf.
    on_nonfinite: Callable[[str, NonFinite], None] | None = None


# A chunk's output bytes and the NaN/±inf it read and wrote.
Merged = tuple[memoryview, NonFinite]


def merge_device(name: str) -> Any:
    """The device for ``merge --device NAME``: ``"cpu"`` as a name (so a merge that runs no torch op never
    imports torch), any other as ``resolve_device`` gives it."""
    return "cpu" if name == "cpu" else resolve_device(name)


def device_type(device: Any) -> str:
    """ "cpu", "cuda", "mps"... of a torch.device or a device name."""
    return str(getattr(device, "type", None) or str(device).split(":")[0])


def resolve_device(name: str) -> torch.device:
    """A torch device from --device; ``auto`` is the first GPU when one is visible, else the CPU."""
    import torch

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
    """One worker's reusable buffers: the raw input bytes (numpy, no torch needed), their compute-dtype
    copies and the output bytes of the chunk it is working on. Reusing them instead of allocating per
    chunk saves the page faults and zero-filling of fresh memory (measured ~30% of the CPU time of
    task_arithmetic on bf16 inputs). Only the chunk being merged uses them, so nothing outlives it."""

    def __init__(self) -> None:
        self._bytes: dict[tuple[str, int], np.ndarray] = {}
        self._store: dict[tuple[str, int, Any, Any], torch.Tensor] = {}

    def raw(self, slot: str, index: int, nbytes: int) -> np.ndarray:
        """A uint8 array of ``nbytes`` for slot ``(slot, index)``."""
        buf = self._bytes.get((slot, index))
        if buf is None or buf.size < nbytes:
            buf = np.empty(nbytes, dtype=np.uint8)
            self._bytes[(slot, index)] = buf
        return buf[:nbytes]

    def get(self, slot: str, index: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A torch tensor of ``numel`` elements for slot ``(slot, index, dtype, device)``."""
        import torch

        key = (slot, index, dtype, device)
        buf = self._store.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._store[key] = buf
        return buf[:numel]


def _bytes_view(t: Any) -> memoryview:
    """The bytes of a numpy array or a CPU torch tensor."""
    if isinstance(t, np.ndarray):
        return memoryview(t).cast("B")
    import torch

    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _tensor(raw: Any) -> torch.Tensor:
    """A raw byte buffer as a uint8 torch tensor (no copy)."""
    import torch

    return torch.from_numpy(raw) if isinstance(raw, np.ndarray) else raw


def _computed_on_read(ref: InputRef) -> bool:
    """Whether reading the input's rows computes (vocabulary rows gathered, LoRA factors applied): torch."""
    return ref.rows is not None or (isinstance(ref.tensor, AdaptedTensor) and ref.tensor.computed)


def _read_rows(
    files: InputFiles, refs: tuple[InputRef, ...], first_row: int, rows: int, bufs: ChunkBuffers | None
) -> list[np.ndarray]:
    """The rows of each input as uint8 arrays (in ``bufs`` when given)."""
    out = []
    for i, ref in enumerate(refs):
        rb = ref.tensor.row_bytes
        n = rows * rb
        raw = np.empty(n, dtype=np.uint8) if bufs is None else bufs.raw("raw", i, n)
        if n and ref.rows is not None:
            from mergekitlite.gather import gather_rows

            gather_rows(files, ref.rows, first_row, rows, _bytes_view(raw))
        elif n and _computed_on_read(ref):  # a model+adapter input
            from mergekitlite.lora.rows import read_rows

            read_rows(files, ref.tensor, first_row, rows, _bytes_view(raw), bufs)
        elif n:
            files.read_into(ref.tensor, first_row * rb, _bytes_view(raw))
        out.append(raw)
    return out


def read_chunk(
    files: InputFiles, task: TensorTask, info: ChunkInfo, bufs: ChunkBuffers | None = None
) -> list[np.ndarray]:
    return _read_rows(files, task.inputs, info.row_start, info.row_end - info.row_start, bufs)


def _read_part(files: InputFiles, chunk: _Chunk, bufs: ChunkBuffers | None) -> list[np.ndarray]:
    rule = chunk.rule
    if rule is None:
        return read_chunk(files, chunk.task, chunk.info, bufs)
    offset = (rule.src_start if rule.src_start is not None else rule.start) - rule.start
    rows = chunk.info.row_end - chunk.info.row_start
    return _read_rows(files, rule.sources, chunk.info.row_start + offset, rows, bufs)


def _typed(raw: Any, code: str, shape: tuple[int, ...]) -> torch.Tensor:
    return _tensor(raw).view(torch_dtype(code)).view(shape)


def count_nonfinite(t: torch.Tensor) -> int:
    """NaN and ±inf values in ``t``. A finite sum proves every value finite (NaN and inf propagate
    through additions): one reduction in the tensor's own dtype, no temporary, in the common case.
    float16 sums overflow too often to be a test; its minimum and maximum are (min/max propagate
    NaN). The values are counted only when the test fails. (A float32 sum of a 16-bit tensor
    converts it first: that cost 4× the torch path's time per chunk.)"""
    import torch

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
    import torch

    bad = count_nonfinite(out)
    if not bad:
        return NonFinite()
    overflow = ~torch.isfinite(out.view(result.shape)) & torch.isfinite(result).cpu()
    return NonFinite(outputs=bad, overflow=int(overflow.sum()))


def _to_output(result: torch.Tensor, code: str, bufs: ChunkBuffers | None) -> Merged:
    """Cast once to the output dtype, on the host, as bytes; with the NaN/±inf the cast left."""
    import torch

    from mergekitlite.rounding import narrow_once

    dtype = torch_dtype(code)
    narrowed = narrow_once(result, dtype) if result.dtype == torch.float64 else result
    if bufs is None:
        out = narrowed.to(dtype=dtype, device="cpu").contiguous().reshape(-1)
    else:
        out = bufs.get("out", 0, result.numel(), dtype, torch.device("cpu"))
        out.view(result.shape).copy_(narrowed)
    return _bytes_view(out), _output_counts(result, out)


# Per float dtype: the unsigned integer view, the magnitude bits and the all-ones exponent.
_EXPONENT = {
    "BF16": (np.uint16, 0x7FFF, 0x7F80),
    "F16": (np.uint16, 0x7FFF, 0x7C00),
    "F32": (np.uint32, 0x7FFFFFFF, 0x7F800000),
    "F64": (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}


def count_raw(raw: Any, code: str) -> int:
    """NaN/±inf among raw values of a float dtype, without torch: a value is non-finite exactly when its
    magnitude bits are at least the all-ones exponent, so the largest magnitude decides, and only a
    buffer that fails is counted. Other dtypes (integers, 8-bit floats) count 0."""
    spec = _EXPONENT.get(code)
    if spec is None or len(raw) == 0:
        return 0
    utype, magnitude, exponent = spec
    bits = np.frombuffer(_bytes_view(raw), dtype=utype) & utype(magnitude)
    if bits.max() < exponent:
        return 0
    return int(np.count_nonzero(bits >= exponent))


def _passed_through(raw: Any, ref: InputRef) -> Merged:
    """An input's bytes as the output's: what it holds, it writes."""
    found = count_raw(raw, ref.tensor.dtype)
    return _bytes_view(raw), NonFinite(found, found, 0, {ref.model: found} if found else {})


def _rule_needs_torch(rule: RowRule, out_dtype: str) -> bool:
    return not (rule.kind == "take" and rule.sources[0].tensor.dtype == out_dtype)


def apply_rule(
    task: TensorTask,
    rule: RowRule,
    raw: list[Any],
    rows: int,
    compute: Any,
    bufs: ChunkBuffers | None = None,
) -> Merged:
    """Rows set by a row rule: a zero row, a row taken from a model, or the mean of models' rows."""
    if not _rule_needs_torch(rule, task.out_dtype):
        return _passed_through(raw[0], rule.sources[0])
    import torch

    compute = compute_dtype(compute)
    shape = (rows, *task.shape[1:])
    if rule.kind == "zero":
        return _bytes_view(torch.zeros(shape, dtype=torch_dtype(task.out_dtype)).reshape(-1)), NonFinite()
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


def compute_dtype(compute: Any) -> torch.dtype:
    """A torch dtype from a torch dtype or a name ("float32": the plan's ``compute_dtype``)."""
    return torch_dtype(CODE_BY_NAME[compute]) if isinstance(compute, str) else compute


def to_compute(
    task: TensorTask,
    raw: list[Any],
    info: ChunkInfo,
    compute: Any,
    device: Any,
    bufs: ChunkBuffers | None = None,
    found: list[int] | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Input bytes → (base, models) tensors in the compute dtype on the compute device. ``found``:
    append each input's NaN/±inf count, taken while the copy is still in the cache."""
    import torch

    compute, device = compute_dtype(compute), torch.device(device)
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


def _native_compute(compute: Any, device: Any) -> bool:
    """Native kernels compute in float32 on the CPU. ``compute``: a torch dtype or its name."""
    return device_type(device) == "cpu" and str(compute).removeprefix("torch.") == "float32"


def native_form(task: TensorTask, compute: Any, device: Any, stats: Any = None) -> LinearForm | None:
    """The form to hand to the native kernel for ``task`` (given its statistic, for methods whose form comes
    from it), or None when the torch path must run it. ``compute``: a torch dtype or its name."""
    if task.copy_of is not None or not _native_compute(compute, device):
        return None
    if any(_computed_on_read(ref) for ref in task.inputs):
        return None
    if not native.supports([ref.tensor.dtype for ref in task.inputs], task.out_dtype):
        return None
    with _naming_the_tensor(task):
        return get_method(task.method).form(task.base is not None, len(task.models), task.param_dict, stats)


def native_kernel(task: TensorTask, compute: Any, device: Any) -> NativeMerge | None:
    """The method's own native merge for ``task``, as its declaration prepares it (``MethodSpec.native_merge``:
    it says whether it takes the task's dtypes), or None: the torch path."""
    if task.copy_of is not None or not _native_compute(compute, device):
        return None
    if any(_computed_on_read(ref) for ref in task.inputs):
        return None
    codes = [ref.tensor.dtype for ref in task.inputs]
    with _naming_the_tensor(task):
        return get_method(task.method).native_merge(
            task.base is not None, len(task.models), task.param_dict, codes, task.out_dtype
        )


def merge_chunk(
    task: TensorTask,
    raw: list[Any],
    info: ChunkInfo,
    compute: Any,
    device: Any,
    stats: Any = None,
    bufs: ChunkBuffers | None = None,
    form: LinearForm | None = None,
    kernel: NativeMerge | None = None,
) -> Merged:
    """Merge one row chunk: raw input bytes in, raw output bytes out, and the NaN/±inf read and
    written. With a ``form`` (see ``native_form``) the linear kernel computes it; with a ``kernel`` (see
    ``native_kernel``) the method's own native kernel, unless it declines the chunk; else the method's
    torch function."""
    rows = info.row_end - info.row_start
    shape = (rows, *task.shape[1:]) if task.shape else ()
    if task.copy_of is not None:
        return _passed_through(raw[0], task.copy_of)
    if rows == 0 or math.prod(task.shape) == 0:
        return memoryview(b""), NonFinite()
    if form is not None:
        nbytes = rows * _row_bytes(task.out_dtype, task.shape)
        out = np.empty(nbytes, dtype=np.uint8) if bufs is None else bufs.raw("out", 0, nbytes)
        found = native.run_linear(form, raw, [ref.tensor.dtype for ref in task.inputs], out, task.out_dtype)
        return _bytes_view(out), NonFinite.from_kernel(found, [ref.model for ref in task.inputs])
    if kernel is not None:
        nbytes = rows * _row_bytes(task.out_dtype, task.shape)
        out = np.empty(nbytes, dtype=np.uint8) if bufs is None else bufs.raw("out", 0, nbytes)
        found = kernel(raw, out, info, stats)
        if found is not None:
            return _bytes_view(out), NonFinite.from_kernel(found, [ref.model for ref in task.inputs])
    import torch

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
    compute: Any,
    device: Any,
    pool: ThreadPoolExecutor | None = None,
    lookahead: int = 2,
    native: bool = True,
) -> Any:
    """Run the statistic passes of ``task``'s method. Chunks are re-read for every pass (from the
    page cache, cheaper than holding the tensor); with a ``pool``, the next chunks are read and
    converted by the workers while this thread updates the statistic. With ``native``, a statistic
    with a raw-byte update (``update_raw``) is handed the chunks' raw bytes instead.

    Chunks are read and converted into reused buffers, never fresh memory (page faults, zero-fill):
    one set per worker when the pass is spread over the workers (each folds one chunk at a time), else
    one per chunk that may be alive at once (the one being folded and the ``lookahead`` pending)."""
    from mergekitlite.methods.apply import RawChunk, compute_stats

    spec = get_method(task.method)
    if spec.statistic is None or math.prod(task.shape) == 0:
        return None
    infos = task_chunks(task)
    index = {info.row_start: i for i, info in enumerate(infos)}
    pending: dict[int, Future[tuple[torch.Tensor | None, list[torch.Tensor]]]] = {}
    concurrent = pool is not None and getattr(spec.statistic, "concurrent", False)
    direct = pool is None or concurrent  # each chunk is read by the thread that folds it
    local = threading.local()
    slots = [ChunkBuffers() for _ in range(lookahead + 1)]

    def buffers(i: int) -> ChunkBuffers:
        if direct:
            return local.__dict__.setdefault("buffers", ChunkBuffers())
        return slots[i % len(slots)]  # chunk i - 1 has been folded before chunk i + lookahead is read

    def fetch(i: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        bufs = buffers(i)
        return to_compute(task, read_chunk(files, task, infos[i], bufs), infos[i], compute, device, bufs)

    def fetch_raw(info: ChunkInfo) -> RawChunk:
        bufs = buffers(index[info.row_start])
        raw = read_chunk(files, task, info, bufs)
        codes = [ref.tensor.dtype for ref in task.inputs]
        return RawChunk(raw, codes, lambda: to_compute(task, raw, info, compute, device, bufs))

    def load(info: ChunkInfo) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        i = index[info.row_start]
        if pool is None or concurrent:  # concurrent: already on a worker, which reads its own chunk
            return fetch(i)
        for j in range(i, min(len(infos), i + lookahead + 1)):
            if j not in pending:
                pending[j] = pool.submit(fetch, j)
        return pending.pop(i).result()

    shape = (task.merged_rows, *task.shape[1:]) if task.shape else ()
    use_raw = native and direct and task.base is not None and _native_compute(compute, device)
    with _naming_the_tensor(task):
        return compute_stats(
            spec,
            shape,
            task.param_dict,
            len(task.models),
            infos,
            load,
            pool if concurrent else None,
            lookahead + 1,
            native=native,
            load_raw=fetch_raw if use_raw else None,
        )


@contextmanager
def _naming_the_tensor(task: TensorTask) -> Iterator[None]:
    """A method's arithmetic knows no tensor names: say which tensor its inputs failed on."""
    try:
        yield
    except MethodInputError as exc:
        raise MethodInputError(f"tensor {task.name}: {exc}") from None


class _Torch:
    """torch for the chunks that compute with it, imported by the first of them (a merge of copies and
    native linear forms never imports it). Workers each run single-threaded torch ops on their own chunk
    (see budget.default_workers); the caller's thread count comes back at the end."""

    def __init__(self) -> None:
        self._saved: int | None = None

    def need(self) -> None:
        if self._saved is None:
            import torch

            self._saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def restore(self) -> None:
        if self._saved is not None:
            import torch

            torch.set_num_threads(self._saved)


def _needs_torch(chunk: _Chunk, form: LinearForm | None) -> bool:
    """Whether a worker computes this chunk with torch (rather than copying bytes or the native kernel)."""
    refs = chunk.task.inputs if chunk.rule is None else chunk.rule.sources
    if any(_computed_on_read(ref) for ref in refs):
        return True
    if chunk.rule is not None:
        return _rule_needs_torch(chunk.rule, chunk.task.out_dtype)
    return chunk.task.copy_of is None and form is None


def run_tasks(plan: Plan, out_dir: Path, ctx: ExecContext, done: set[str] | None = None) -> int:
    """Write every task not in ``done`` into the shard files in ``out_dir``. Returns tensors merged."""
    done = set(done or ())
    todo = [t for t in plan.tasks if t.name not in done]
    total = sum(t.nbytes + sum((r.end - r.start) * _row_bytes(t.out_dtype, t.shape) for r in t.row_rules) for t in todo)
    ctx.progress.start(total, len(todo))
    shards: dict[str, ShardFile] = {}
    torch_scope = _Torch()
    try:
        for layout in plan.shards:
            shards[layout.filename] = ShardFile(out_dir / layout.filename, layout, reuse=bool(done))
        with retained_heap():  # chunk temporaries are reused, not page-faulted again (see heap.py)
            return _pipeline(plan, todo, shards, ctx, torch_scope)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(
                f"the disk is full ({exc.strerror}) while writing {out_dir}; nothing named like the final output "
                "exists. Free some space and run again with --resume to continue."
            ) from None
        raise
    finally:
        torch_scope.restore()
        for s in shards.values():
            s.close()


def _process(
    files: InputFiles,
    shards: dict[str, ShardFile],
    chunk: _Chunk,
    compute: Any,
    device: Any,
    stats: Any,
    local: threading.local,
    form: LinearForm | None,
    kernel: NativeMerge | None = None,
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
        data, found = merge_chunk(task, raw, chunk.info, compute, device, stats, bufs, form, kernel)
    shards[chunk.shard].write(task.name, chunk.info.row_start * _row_bytes(task.out_dtype, task.shape), data)
    return len(data), found


class _Pipeline:
    """One run of the executor's loop: chunks submitted to the workers in order, at most ``inflight`` at a
    time, completed oldest first; finished tensors journalled, shards fsynced every ``sync_every_bytes``."""

    def __init__(
        self, plan: Plan, shards: dict[str, ShardFile], ctx: ExecContext, torch_scope: _Torch, files: InputFiles
    ) -> None:
        self.plan, self.shards, self.ctx, self.torch, self.files = plan, shards, ctx, torch_scope, files
        self.compute = plan.compute_dtype  # a name: torch is imported only when a chunk computes with it
        self.merged = 0
        self.finished: list[str] = []
        self.unsynced = 0
        self.remaining: dict[str, int] = {}
        self.inflight: deque[tuple[_Chunk, Future[tuple[int, NonFinite]]]] = deque()
        self.tally: dict[str, NonFinite] = {}  # NaN/±inf of the tensors in flight, summed over their chunks
        self.last_journal = time.monotonic()
        self.local = threading.local()  # each worker's ChunkBuffers

    def complete_oldest(self) -> None:
        chunk, fut = self.inflight.popleft()
        nbytes, found = fut.result()
        self.ctx.progress.advance(nbytes)
        self.unsynced += nbytes
        name = chunk.task.name
        if found:
            self.tally[name] = self.tally[name] + found if name in self.tally else found
        self.remaining[name] -= 1
        if self.remaining[name] == 0:
            total = self.tally.pop(name, None)
            if total is not None and self.ctx.on_nonfinite is not None:
                self.ctx.on_nonfinite(name, total)
            self.merged += 1
            self.finished.append(name)
            self.ctx.progress.tensor_done(name)
        self.journal(final=False)

    def drain(self) -> None:
        while self.inflight:
            self.complete_oldest()

    def journal(self, final: bool) -> None:
        """Record finished tensors about every second; fsync every ``sync_every_bytes`` and at the end, so
        that the finished output is on disk before it is renamed into place."""
        ctx = self.ctx
        sync = final or (self.unsynced >= ctx.sync_every_bytes and bool(self.finished))
        if sync:
            for s in self.shards.values():
                s.sync()
            self.unsynced = 0
        if ctx.on_done is None or not (self.finished or sync):
            return
        if sync or time.monotonic() - self.last_journal >= ctx.journal_every_s:
            ctx.on_done(list(self.finished), sync)
            self.finished.clear()
            self.last_journal = time.monotonic()

    def submit(self, task: TensorTask, pool: ThreadPoolExecutor) -> None:
        """Queue a task: its statistic passes first (on every worker), then its merge and row-rule chunks."""
        ctx, shard = self.ctx, self.plan.shard_of[task.name]
        parts = _task_parts(task, shard)
        self.remaining[task.name] = len(parts)
        stats = None
        if get_method(task.method).statistic is not None and task.copy_of is None:
            # The statistic passes use every worker: let the previous task's chunks land first, so that two
            # tasks' working sets never overlap (the budget counts one).
            self.drain()
            self.torch.need()
            workers = self.plan.budget.workers
            stats = task_stats(self.files, task, self.compute, ctx.device, pool, lookahead=workers, native=ctx.native)
        form = native_form(task, self.compute, ctx.device, stats) if ctx.native else None
        kernel = native_kernel(task, self.compute, ctx.device) if ctx.native and form is None else None
        rule = None
        for chunk in parts:
            if chunk.rule is not rule:
                # Row rules overwrite rows the merge (or an earlier rule) wrote: everything before a rule must
                # have landed before its first chunk is written.
                self.drain()
                rule = chunk.rule
            while len(self.inflight) >= self.plan.budget.inflight:
                self.complete_oldest()
            if _needs_torch(chunk, form):
                self.torch.need()
            args = (self.files, self.shards, chunk, self.compute, ctx.device, stats, self.local, form, kernel)
            self.inflight.append((chunk, pool.submit(_process, *args)))
        if not parts:  # an empty tensor: its header entry is all there is
            self.remaining[task.name] = 1
            self.inflight.append((_Chunk(task, shard, ChunkInfo(0, 0, task.shape, 0)), _done(0)))


def _pipeline(
    plan: Plan, todo: list[TensorTask], shards: dict[str, ShardFile], ctx: ExecContext, torch_scope: _Torch
) -> int:
    with InputFiles() as files, ThreadPoolExecutor(plan.budget.workers, "mkl-chunk") as pool:
        run = _Pipeline(plan, shards, ctx, torch_scope, files)
        try:
            for task in todo:
                run.submit(task, pool)
            run.drain()
            run.journal(final=True)
        finally:
            for _, f in run.inflight:
                f.cancel()
    return run.merged


def _done(value: int) -> Future[tuple[int, NonFinite]]:
    fut: Future[tuple[int, NonFinite]] = Future()
    fut.set_result((value, NonFinite()))
    return fut
