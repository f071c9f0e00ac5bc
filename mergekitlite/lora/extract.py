"""``extract-lora``: a PEFT LoRA adapter of the difference FINETUNED − BASE, by truncated SVD, tensor by tensor.

Each 2-D weight's delta ΔW is built in float32 from row chunks of both models (``model+adapter`` inputs work
too), decomposed ΔW = U·S·Vh, and truncated to the module's rank: A = √S·Vh, B = U·√S (lora_alpha = r, so
the scale is 1). Embeddings are saved whole (``modules_to_save``, as mergekit does) or, with ``embed_lora``,
decomposed as PEFT's ``lora_embedding_A/B`` (and the output head as an ordinary LoRA). Tensors a LoRA cannot
express (norms, 1-D tensors) are saved whole unless ``skip_undecomposable``; biases of decomposed modules are
dropped (PEFT's LoRA cannot carry them without ``lora_bias``), and the report says so.

Only one tensor's delta exists at a time. Its peak is about ``svd_peak_bytes(m, n)``: ΔW itself, the copy
LAPACK works on, U and the workspace — measured here as ≈ 4.4·m·n + 3.3·k² float32s (k = min(m, n)).
Everything else (reading, the error, writing) is streamed in row blocks.

The report gives, per tensor, the rank kept, the share of Σσ² kept, and ‖ΔW − B·A‖_F / ‖ΔW‖_F computed in
float64 from the factors as written (after their cast to the adapter's dtype).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mergekitlite.budget import BASELINE_RSS, Budget, human
from mergekitlite.errors import OutputError, PlanError
from mergekitlite.io.files import InputFiles
from mergekitlite.io.safetensors_header import (
    FLOAT_CODES,
    TensorInfo,
    code_of,
    layout_shard,
    torch_dtype,
)
from mergekitlite.lora.adapter import PREFIX
from mergekitlite.lora.config import CONFIG_NAME
from mergekitlite.lora.reference import adapter_parts
from mergekitlite.lora.rows import read_rows
from mergekitlite.lora.source import CONV1D_MODEL_TYPES
from mergekitlite.lora.tensor import model_dtype
from mergekitlite.roles import Role, role_of
from mergekitlite.settings import name_matches
from mergekitlite.sources import ModelSource, open_sources

WEIGHTS = "adapter_model.safetensors"
REPORT = "lora_report.json"
READ_BLOCK_ELEMENTS = 1 << 22  # rows are read and the error summed this many elements at a time
SVD_OVERHEAD = 64 * 1000**2  # LAPACK's and torch's own buffers beside the arrays svd_peak_bytes counts

# What becomes of a tensor of the fine-tune.
LORA = "lora"  # decomposed: lora_A / lora_B
EMBEDDING_LORA = "embedding_lora"  # decomposed: lora_embedding_A / lora_embedding_B
SAVED = "saved"  # written whole (modules_to_save)
DROPPED = "dropped"  # differs but cannot be expressed (bias of a decomposed module, --skip-undecomposable)
UNCHANGED = "unchanged"  # equal in both models: nothing to write


@dataclass(frozen=True)
class ExtractOptions:
    rank: int | None = None  # largest rank of any module (None: full rank, or what --energy keeps)
    module_ranks: tuple[tuple[str, int], ...] = ()  # (pattern, rank): first match wins; rank 0 skips the module
    energy: float | None = None  # smallest rank keeping this share of Σσ² (capped by the rank)
    embed_lora: bool = False
    save_modules: tuple[str, ...] = ()  # patterns of modules saved whole
    exclude: tuple[str, ...] = ()  # patterns of tensors left out
    skip_undecomposable: bool = False
    dtype: str | None = None  # safetensors code of the adapter's tensors (default: each tensor's own)
    max_ram: int | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class Item:
    """One tensor of the fine-tune and what the extraction does with it."""

    name: str
    module: str
    kind: str  # LORA / EMBEDDING_LORA / SAVED / DROPPED
    ft: TensorInfo
    base: TensorInfo
    transposed: bool = False  # decompose ΔWᵀ (embeddings, Conv1D weights)
    rank_cap: int = 0
    why: str = ""


@dataclass
class Entry:
    """One line of the report."""

    tensor: str
    module: str
    kind: str
    shape: list[int]
    rank: int = 0
    energy: float | None = None  # share of Σσ² kept
    rel_error: float = 0.0  # ‖ΔW − B·A‖ / ‖ΔW‖ (1.0 when dropped)
    delta_norm: float = 0.0  # ‖ΔW‖_F
    why: str = ""


@dataclass
class Report:
    finetuned: str
    base: str
    entries: list[Entry] = field(default_factory=list)
    rank: int = 0
    peak_estimate: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "finetuned": self.finetuned,
            "base": self.base,
            "r": self.rank,
            "peak_estimate_bytes": self.peak_estimate,
            "overall_rel_error": self.overall_error(),
            "tensors": [asdict(e) for e in self.entries],
        }

    def overall_error(self) -> float:
        """‖ΔW − B·A‖ / ‖ΔW‖ over every tensor together."""
        total = sum(e.delta_norm**2 for e in self.entries)
        err = sum((e.rel_error * e.delta_norm) ** 2 for e in self.entries)
        return math.sqrt(err / total) if total else 0.0


def svd_peak_bytes(m: int, n: int) -> int:
    """Bytes held while one m×n float32 delta is decomposed (see the module docstring; measured with torch 2.13's
    LAPACK gesdd on this project's machine: 3.6–4.1·m·n + 3.2·k² float32s beside ΔW)."""
    k = min(m, n)
    return int(4 * (4.5 * m * n + 3.5 * k * k)) + SVD_OVERHEAD


# ---------------------------------------------------------------- planning
def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _rank_cap(module: str, opts: ExtractOptions, full: int) -> int:
    for pattern, rank in opts.module_ranks:
        if name_matches(pattern, module):
            return min(rank, full)
    return min(opts.rank, full) if opts.rank is not None else full


def plan_extraction(ft: ModelSource, base: ModelSource, opts: ExtractOptions) -> list[Item]:
    """What happens to each tensor of ``ft``; PlanError lists every tensor that cannot be handled."""
    problems: list[str] = []
    items: list[Item] = []
    conv1d = ft.config_value("model_type") in CONV1D_MODEL_TYPES
    for name, info in ft.tensors.items():
        if any(name_matches(p, name) for p in opts.exclude):
            continue
        other = base.tensors.get(name)
        if other is None:
            problems.append(f"{name}: not in the base model {base.ref!r}")
            continue
        if other.shape != info.shape:
            what = (
                " (the vocabularies differ: an adapter cannot change the vocabulary size)"
                if role_of(name)
                in (
                    Role.EMBEDDING,
                    Role.HEAD,
                )
                else ""
            )
            problems.append(f"{name}: {list(info.shape)} in the fine-tune but {list(other.shape)} in the base{what}")
            continue
        if info.dtype not in FLOAT_CODES or other.dtype not in FLOAT_CODES:
            continue  # not floating point: never part of an adapter
        items.append(_classify(name, info, other, opts, conv1d))
    if problems:
        raise PlanError(problems)
    lora_modules = {i.module for i in items if i.kind in (LORA, EMBEDDING_LORA)}
    out = []
    for item in items:
        if item.kind == SAVED and item.name.endswith(".bias") and item.module in lora_modules:
            why = "the bias of a decomposed module (a LoRA cannot carry it; --save-module MODULE saves it whole)"
            item = Item(item.name, item.module, DROPPED, item.ft, item.base, why=why)
        out.append(item)
    return out


def _classify(name: str, ft: TensorInfo, base: TensorInfo, opts: ExtractOptions, conv1d: bool) -> Item:
    module = _module(name)
    role = role_of(name)
    two_d = len(ft.shape) == 2 and name.endswith(".weight")
    if any(name_matches(p, module) for p in opts.save_modules):
        return Item(name, module, SAVED, ft, base, why="--save-module")
    if two_d and role in (Role.EMBEDDING, Role.POSITION):
        if not opts.embed_lora:
            return Item(name, module, SAVED, ft, base, why="an embedding (--embed-lora decomposes it)")
        cap = _rank_cap(module, opts, min(ft.shape))
        return Item(name, module, EMBEDDING_LORA, ft, base, transposed=True, rank_cap=cap)
    if two_d and role is Role.HEAD and not opts.embed_lora:
        return Item(name, module, SAVED, ft, base, why="the output head (--embed-lora decomposes it)")
    if two_d:
        cap = _rank_cap(module, opts, min(ft.shape))
        if cap == 0:
            return Item(name, module, DROPPED, ft, base, why="rank 0 (--module-rank)")
        transposed = conv1d and role is not Role.HEAD  # Conv1D stores [in, out]; PEFT merges (B·A)ᵀ
        return Item(name, module, LORA, ft, base, transposed=transposed, rank_cap=cap)
    if opts.skip_undecomposable:
        return Item(name, module, DROPPED, ft, base, why="not a 2-D weight (--skip-undecomposable)")
    return Item(name, module, SAVED, ft, base, why="not a 2-D weight: saved whole")


def check_memory(items: Sequence[Item], budget: Budget) -> int:
    """The largest decomposition's estimated peak (with the interpreter); PlanError when it exceeds --max-ram."""
    peak = BASELINE_RSS
    problems = []
    limit = budget.ram if budget.ram is not None else BASELINE_RSS + budget.chunk_ram() * 4
    for item in items:
        if item.kind not in (LORA, EMBEDDING_LORA):
            continue
        need = BASELINE_RSS + svd_peak_bytes(*item.ft.shape)
        peak = max(peak, need)
        if need > limit:
            problems.append(
                f"{item.name} {list(item.ft.shape)}: its SVD needs ~{human(need)}, over the memory limit "
                f"({human(limit)}); raise --max-ram, save it whole (--save-module) or leave it out (--exclude)"
            )
    if problems:
        raise PlanError(problems)
    return peak


# ---------------------------------------------------------------- the delta and its decomposition
def _delta(files: InputFiles, item: Item) -> torch.Tensor:
    """FT − BASE in float32, read in row blocks."""
    rows = item.ft.shape[0] if item.ft.shape else 1
    out = torch.empty(rows, item.ft.numel // rows if rows else 0, dtype=torch.float32)
    start = 0
    for f, b in zip(_blocks(files, item.ft), _blocks(files, item.base)):
        out[start : start + f.shape[0]] = f
        out[start : start + f.shape[0]] -= b
        start += f.shape[0]
    return out


def _blocks(files: InputFiles, info: TensorInfo) -> Iterator[torch.Tensor]:
    """``info``'s values in float32, in row blocks of about READ_BLOCK_ELEMENTS (exact: float32 holds every
    bf16/fp16 value; a LoRA'd input is float32 already)."""
    rows = info.shape[0] if info.shape else 1
    cols = info.numel // rows if rows else 0
    step = max(1, READ_BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield _rows(files, info, start, min(step, rows - start), cols)


def _rows(files: InputFiles, info: TensorInfo, start: int, rows: int, cols: int) -> torch.Tensor:
    raw = torch.empty(rows * info.row_bytes, dtype=torch.uint8)
    read_rows(files, info, start, rows, memoryview(raw.numpy()).cast("B"))
    return raw.view(torch_dtype(info.dtype)).view(rows, cols).to(torch.float32)


def _energy_rank(s2: torch.Tensor, energy: float) -> int:
    """The smallest k with Σ_{i<k} σᵢ² ≥ energy · Σ σᵢ²."""
    total = float(s2.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(s2, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64) - 1e-12)) + 1


def decompose(
    delta: torch.Tensor, cap: int, energy: float | None, out_dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(B [m, k], A [k, n], k, share of Σσ² kept) for the m×n ``delta``, cast to ``out_dtype`` (on the host)."""
    u, s, vh = torch.linalg.svd(delta.to(device), full_matrices=False)
    s2 = s.to(torch.float64) ** 2
    # Singular values at float32 rounding level (numpy's matrix_rank tolerance) are noise, not rank.
    noise = float(s[0]) * max(delta.shape) * torch.finfo(torch.float32).eps if len(s) else 0.0
    k = min(cap, int((s > noise).sum()))
    if energy is not None:
        k = min(k, max(1, _energy_rank(s2, energy)))
    kept = float(s2[:k].sum() / s2.sum()) if float(s2.sum()) else 1.0
    root = torch.sqrt(s[:k])
    b = (u[:, :k] * root).to(device="cpu", dtype=out_dtype)
    a = (root.unsqueeze(1) * vh[:k]).to(device="cpu", dtype=out_dtype)
    return b, a, k, kept


def relative_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> tuple[float, float]:
    """(‖ΔW − B·A‖ / ‖ΔW‖, ‖ΔW‖) in float64, in row blocks."""
    a64 = a.to(torch.float64)
    err = norm = 0.0
    step = max(1, READ_BLOCK_ELEMENTS // max(delta.shape[1], 1))
    for start in range(0, delta.shape[0], step):
        d = delta[start : start + step].to(torch.float64)
        norm += float((d * d).sum())
        r = d - b[start : start + step].to(torch.float64) @ a64
        err += float((r * r).sum())
    return (math.sqrt(err / norm) if norm else 0.0), math.sqrt(norm)


# ---------------------------------------------------------------- writing
class AdapterWriter:
    """Tensors appended to a data file as they are made; the safetensors header (which needs every shape, and
    ranks are known only after each SVD) is written in front at the end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.data_path = folder / (WEIGHTS + ".data")
        self.data = open(self.data_path, "wb")  # noqa: SIM115 - closed in finish()
        self.entries: list[tuple[str, str, tuple[int, ...]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.contiguous()
        self.data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.entries.append((name, code_of(t.dtype), tuple(t.shape)))

    def add_rows(self, name: str, code: str, shape: tuple[int, ...], blocks: Iterable[torch.Tensor]) -> None:
        """A tensor written block by block: ``blocks`` are its row blocks in ``code``'s dtype."""
        for block in blocks:
            self.data.write(memoryview(block.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.entries.append((name, code, shape))

    def finish(self) -> None:
        self.data.close()
        layout = layout_shard(WEIGHTS, self.entries)
        with open(self.folder / WEIGHTS, "wb") as out, open(self.data_path, "rb") as data:
            out.write(layout.header)
            shutil.copyfileobj(data, out, 8 * 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        self.data_path.unlink()


def _peft_name(item: Item, which: str) -> str:
    if item.kind == EMBEDDING_LORA:
        return f"{PREFIX}{item.module}.lora_embedding_{which}"
    return f"{PREFIX}{item.module}.lora_{which}.weight"


def adapter_config(report: Report, base_ref: str, conv1d: bool) -> dict[str, object]:
    """PEFT's adapter_config.json: r = lora_alpha = the largest rank (scale 1); modules of another rank get it in
    rank_pattern and alpha_pattern, keyed by their escaped full path (peft matches patterns at the end)."""
    ranks = {e.module: e.rank for e in report.entries if e.kind in (LORA, EMBEDDING_LORA)}
    r = max(ranks.values(), default=1)
    other = {re.escape(m): k for m, k in ranks.items() if k != r}
    saved = sorted({e.module for e in report.entries if e.kind == SAVED})
    targets = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": other,
        "alpha_pattern": other,
        "target_modules": targets,
        "modules_to_save": saved or None,
        "fan_in_fan_out": conv1d,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "init_lora_weights": True,
    }


# ---------------------------------------------------------------- the whole run
def _check_output(out: Path, inputs: Sequence[ModelSource], overwrite: bool) -> None:
    out = out.resolve()
    for src in inputs:
        folder = src.path.resolve()
        if out == folder or folder in out.parents or out in folder.parents:
            raise OutputError(f"output {out} overlaps input model {src.ref!r} ({folder}); choose another folder")
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite to replace it")


def extract_lora(
    finetuned: str,
    base: str,
    out: Path,
    opts: ExtractOptions,
    *,
    overwrite: bool = False,
    on_item: Callable[[Item], None] | None = None,
) -> Report:
    """Write the adapter of ``finetuned`` − ``base`` into ``out`` (via ``out.partial``); return the report."""
    from mergekitlite.execute import resolve_device
    from mergekitlite.output import PartialOutput, partial_path

    if opts.rank is None and opts.energy is None and not opts.module_ranks:
        raise PlanError(["give --rank R (the largest rank) or --energy F (the share of Σσ² to keep), or both"])
    device = resolve_device(opts.device)
    for ref in (finetuned, base):
        try:
            adapter_parts(ref, Path.cwd())
        except ValueError as exc:
            raise PlanError([str(exc)]) from None
    sources, problems = open_sources([finetuned, base], Path.cwd())
    if problems:
        raise PlanError(problems)
    ft_src, base_src = sources[finetuned], sources[base]
    _check_output(out, [ft_src, base_src], overwrite)
    items = plan_extraction(ft_src, base_src, opts)
    peak = check_memory(items, Budget(ram=opts.max_ram, on_gpu=device.type != "cpu"))
    report = Report(finetuned, base, peak_estimate=peak)
    partial = partial_path(out)
    if partial.exists():  # an interrupted extraction's: only our own files may be removed
        ours = {WEIGHTS, WEIGHTS + ".data", CONFIG_NAME, REPORT, "README.md"}
        if not partial.is_dir() or any(p.name not in ours for p in partial.iterdir()):
            raise OutputError(f"{partial} exists and is not an unfinished adapter; move it away")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    writer = AdapterWriter(partial)
    with InputFiles() as files:
        for item in items:
            report.entries.append(_extract_one(files, item, opts, device, writer))
            if on_item is not None:
                on_item(item)
    writer.finish()
    conv1d = ft_src.config_value("model_type") in CONV1D_MODEL_TYPES
    report.rank = max((e.rank for e in report.entries), default=0)
    (partial / CONFIG_NAME).write_text(
        json.dumps(adapter_config(report, base, conv1d), indent=2) + "\n", encoding="utf-8"
    )
    (partial / REPORT).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    (partial / "README.md").write_text(_card(report, opts), encoding="utf-8")
    PartialOutput(out, partial, "").commit(overwrite=overwrite)
    return report


def _out_dtype(item: Item, opts: ExtractOptions) -> torch.dtype:
    return torch_dtype(opts.dtype or model_dtype(item.ft))


def _extract_one(files: InputFiles, item: Item, opts: ExtractOptions, device: torch.device, w: AdapterWriter) -> Entry:
    entry = Entry(item.name, item.module, item.kind, list(item.ft.shape), why=item.why)
    if item.kind == DROPPED:
        entry.delta_norm = _delta_norm(files, item)
        entry.rel_error = 1.0 if entry.delta_norm else 0.0
        entry.kind = DROPPED if entry.delta_norm else UNCHANGED
        return entry
    if item.kind == SAVED:
        return _save_whole(files, item, opts, w, entry)
    delta = _delta(files, item)
    if not bool(delta.any()):
        entry.kind = UNCHANGED
        return entry
    matrix = delta.t() if item.transposed else delta  # PEFT's B·A (ΔWᵀ for embeddings and Conv1D)
    b, a, k, kept = decompose(matrix, item.rank_cap, opts.energy, _out_dtype(item, opts), device)
    entry.rank, entry.energy = k, kept
    entry.rel_error, entry.delta_norm = relative_error(matrix, b, a)
    del delta, matrix
    w.add(_peft_name(item, "A"), a)
    w.add(_peft_name(item, "B"), b)
    return entry


def _delta_norm(files: InputFiles, item: Item) -> float:
    """‖FT − BASE‖_F in float64, streamed."""
    pairs = zip(_blocks(files, item.ft), _blocks(files, item.base))
    return math.sqrt(sum(float(((f.to(torch.float64) - b) ** 2).sum()) for f, b in pairs))


def _save_whole(files: InputFiles, item: Item, opts: ExtractOptions, w: AdapterWriter, entry: Entry) -> Entry:
    """The fine-tune's tensor as it is (cast to the adapter's dtype), streamed in row blocks; skipped when equal."""
    entry.delta_norm = _delta_norm(files, item)
    delta_sq = entry.delta_norm**2
    if delta_sq == 0.0:
        entry.kind = UNCHANGED
        return entry
    dtype = _out_dtype(item, opts)
    w.add_rows(PREFIX + item.name, code_of(dtype), item.ft.shape, (b.to(dtype) for b in _blocks(files, item.ft)))
    if dtype != torch_dtype(item.ft.dtype):  # the copy itself is rounded: report that error
        rounded = ((b - b.to(dtype).to(torch.float32)).to(torch.float64) for b in _blocks(files, item.ft))
        err = sum(float((r * r).sum()) for r in rounded)
        entry.rel_error = math.sqrt(err / delta_sq)
    return entry


def _card(report: Report, opts: ExtractOptions) -> str:
    return (
        f"# LoRA adapter of {report.finetuned} − {report.base}\n\n"
        f"Extracted with mergekitlite `extract-lora` (truncated SVD, r = {report.rank}"
        + (f", energy {opts.energy}" if opts.energy is not None else "")
        + f"). Overall relative error ‖ΔW − B·A‖/‖ΔW‖: {report.overall_error():.4g}; per tensor in `{REPORT}`.\n\n"
        f"Apply it while merging with `base_model: {report.base}+THIS_FOLDER` (mergekitlite or mergekit), or with "
        "peft (`PeftModel.from_pretrained(model, THIS_FOLDER).merge_and_unload()`).\n"
    )
