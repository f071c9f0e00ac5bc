"""``mergekitlite diff A B [--base BASE]``: how far apart two checkpoints are, per layer and module.

For every tensor the two models share, with ``r`` the reference (``B``, or ``BASE`` when given):

* without a base: ``rel_a = ‖A − B‖ / ‖B‖``, the relative size of the whole difference;
* with a base: ``rel_a = ‖A − base‖ / ‖base‖`` and ``rel_b = ‖B − base‖ / ‖base‖``, how much each
  model moved away from the base, and ``cosine = (A − base)·(B − base) / (‖A − base‖ ‖B − base‖)``,
  whether the two fine-tunes moved the same way (≈ 0: independent, < 0: they pull against each other).

Norms are Frobenius norms over the whole tensor. Tensors are grouped by layer (the first all-digit
path component, ``roles.split_layer``) and by module (the name with the layer prefix and index
removed, e.g. ``self_attn.q_proj.weight``); that grid is what a per-layer weight gradient in a
recipe is chosen from.

Nothing is loaded whole: each tensor is read in row chunks of about a million elements with
``pread`` (``InputFiles``), converted to float64 and reduced to a handful of sums (``‖r‖²`` and the
Gram matrix of the deltas), so a 14B model is compared in a few tens of MB of memory.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mergekitlite.budget import CACHE_CHUNK_ELEMENTS
from mergekitlite.errors import MergekitliteError
from mergekitlite.io.files import InputFiles
from mergekitlite.io.safetensors_header import FLOAT_CODES, TensorInfo, torch_dtype
from mergekitlite.roles import split_layer
from mergekitlite.sources import ModelSource, index_model, resolve_model_path

# metric key → column title (the keys are TensorDelta field names)
METRICS_NO_BASE = {"rel_a": "‖A−B‖/‖B‖"}
METRICS_WITH_BASE = {"rel_a": "‖A−base‖/‖base‖", "rel_b": "‖B−base‖/‖base‖", "cosine": "cos(A−base, B−base)"}


@dataclass(frozen=True)
class TensorDelta:
    """The comparison of one tensor; NaN where a ratio is undefined (a zero reference or delta)."""

    name: str
    layer: str | None  # "3" (or "prefix.3" when the model has several layer stacks); None outside layers
    module: str  # the name without its layer prefix and index; the full name outside layers
    numel: int
    rel_a: float
    rel_b: float | None = None
    cosine: float | None = None


@dataclass
class DiffResult:
    a: str
    b: str
    base: str | None
    tensors: list[TensorDelta] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "name: why" for tensors that could not be compared

    @property
    def metrics(self) -> dict[str, str]:
        return METRICS_WITH_BASE if self.base else METRICS_NO_BASE

    def layers(self) -> list[str]:
        """Layer labels in model order (numeric within each stack)."""
        seen = {t.layer for t in self.tensors if t.layer is not None}
        return sorted(seen, key=_layer_sort_key)

    def modules(self) -> list[str]:
        """Module names of layer tensors, in the order they first appear in the checkpoint."""
        return list(dict.fromkeys(t.module for t in self.tensors if t.layer is not None))

    def others(self) -> list[TensorDelta]:
        """Tensors outside the layer stack (embeddings, final norm, lm_head)."""
        return [t for t in self.tensors if t.layer is None]

    def grid(self, metric: str) -> list[list[float]]:
        """``grid[i][j]``: ``metric`` of layer ``layers()[i]``, module ``modules()[j]`` (NaN if absent)."""
        layers, modules = self.layers(), self.modules()
        row = {name: i for i, name in enumerate(layers)}
        col = {name: j for j, name in enumerate(modules)}
        out = [[math.nan] * len(modules) for _ in layers]
        for t in self.tensors:
            if t.layer is not None:
                value = getattr(t, metric)
                out[row[t.layer]][col[t.module]] = math.nan if value is None else value
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "a": self.a,
            "b": self.b,
            "base": self.base,
            "metrics": self.metrics,
            "layers": self.layers(),
            "modules": self.modules(),
            "tensors": [{k: _json_number(v) for k, v in asdict(t).items()} for t in self.tensors],
            "skipped": self.skipped,
        }


def _layer_sort_key(label: str) -> tuple[str, int]:
    prefix, _, idx = label.rpartition(".")
    return prefix, int(idx)


def _json_number(value: object) -> object:
    """NaN and infinity are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def layer_and_module(name: str, several_stacks: bool) -> tuple[str | None, str]:
    """``model.layers.3.mlp.up_proj.weight`` → ``("3", "mlp.up_proj.weight")``; outside layers ``(None, name)``."""
    parts = split_layer(name)
    if parts is None:
        return None, name
    prefix, idx, rest = parts
    return (f"{prefix}{idx}" if several_stacks else str(idx)), rest


# ------------------------------------------------------------------------------------------ reading


def read_rows(files: InputFiles, info: TensorInfo, first: int, count: int) -> torch.Tensor:
    """Rows ``first .. first+count`` of ``info`` (a scalar is one row), flattened, as float64."""
    row_bytes = info.row_bytes
    raw = files.read(info, first * row_bytes, count * row_bytes)
    return torch.frombuffer(raw, dtype=torch_dtype(info.dtype)).to(torch.float64)


def rows_per_chunk(info: TensorInfo, chunk_elements: int) -> int:
    rows = info.shape[0] if info.shape else 1
    per_row = max(1, info.numel // max(rows, 1))
    return max(1, min(rows, chunk_elements // per_row))


def tensor_sums(
    files: InputFiles, ref: TensorInfo, others: Sequence[TensorInfo], chunk_elements: int = CACHE_CHUNK_ELEMENTS
) -> tuple[float, list[list[float]]]:
    """``(‖r‖², G)`` with ``G[i][j] = (x_i − r)·(x_j − r)`` for the tensors ``others``, reference ``r``.

    Sums are float64 dot products over row chunks; each chunk's partial sum is exact to float64
    rounding, so the result matches a float64 computation over the full tensors.
    """
    rows = ref.shape[0] if ref.shape else 1
    step = rows_per_chunk(ref, chunk_elements)
    rr = 0.0
    gram = [[0.0] * len(others) for _ in others]
    for first in range(0, rows, step):
        count = min(step, rows - first)
        r = read_rows(files, ref, first, count)
        deltas = [read_rows(files, x, first, count) - r for x in others]
        rr += float(torch.dot(r, r))
        for i, di in enumerate(deltas):
            for j in range(i, len(deltas)):
                gram[i][j] += float(torch.dot(di, deltas[j]))
    for i in range(len(others)):
        for j in range(i):
            gram[i][j] = gram[j][i]
    return rr, gram


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _cosine(ab: float, aa: float, bb: float) -> float:
    if aa == 0.0 or bb == 0.0:
        return math.nan
    return max(-1.0, min(1.0, ab / math.sqrt(aa * bb)))


def compare_tensor(
    files: InputFiles,
    name: str,
    a: TensorInfo,
    b: TensorInfo,
    base: TensorInfo | None,
    several_stacks: bool,
    chunk_elements: int = CACHE_CHUNK_ELEMENTS,
) -> TensorDelta:
    """The metrics of one tensor (see the module docstring)."""
    layer, module = layer_and_module(name, several_stacks)
    if base is None:
        rr, gram = tensor_sums(files, b, [a], chunk_elements)
        return TensorDelta(name, layer, module, a.numel, _ratio(math.sqrt(gram[0][0]), math.sqrt(rr)))
    rr, gram = tensor_sums(files, base, [a, b], chunk_elements)
    norm_r = math.sqrt(rr)
    return TensorDelta(
        name,
        layer,
        module,
        a.numel,
        rel_a=_ratio(math.sqrt(gram[0][0]), norm_r),
        rel_b=_ratio(math.sqrt(gram[1][1]), norm_r),
        cosine=_cosine(gram[0][1], gram[0][0], gram[1][1]),
    )


def _why_not(name: str, infos: dict[str, TensorInfo | None]) -> str | None:
    """Why tensor ``name`` cannot be compared across ``infos`` (model label → its tensor), or None."""
    missing = [label for label, info in infos.items() if info is None]
    if missing:
        return f"{name}: not in {', '.join(missing)}"
    present = [info for info in infos.values() if info is not None]
    shapes = {info.shape for info in present}
    if len(shapes) > 1:
        listed = ", ".join(f"{label} {list(info.shape)}" for label, info in infos.items() if info is not None)
        return f"{name}: shapes differ ({listed})"
    if any(info.dtype not in FLOAT_CODES for info in present):
        return f"{name}: not a float tensor"
    if present[0].numel == 0:
        return f"{name}: empty"
    return None


def open_model(ref: str) -> ModelSource:
    path, hub = resolve_model_path(ref)
    return index_model(ref, path, hub)


def diff_models(
    a: ModelSource,
    b: ModelSource,
    base: ModelSource | None = None,
    *,
    chunk_elements: int = CACHE_CHUNK_ELEMENTS,
    on_tensor: Callable[[str, int], None] | None = None,
) -> DiffResult:
    """Compare every tensor of ``a`` with ``b`` (and ``base``), one tensor at a time.

    ``on_tensor(name, bytes_read)`` is called after each tensor (for a progress bar).
    """
    result = DiffResult(a.ref, b.ref, base.ref if base else None)
    several_stacks = len(a.layer_counts) > 1
    labels = {"A": a, "B": b, **({"base": base} if base else {})}
    with InputFiles() as files:
        for name, info_a in a.tensors.items():
            infos = {label: src.tensors.get(name) for label, src in labels.items()}
            why = _why_not(name, infos)
            if why is not None:
                result.skipped.append(why)
                continue
            info_b = b.tensors[name]
            info_base = base.tensors[name] if base else None
            result.tensors.append(
                compare_tensor(files, name, info_a, info_b, info_base, several_stacks, chunk_elements)
            )
            if on_tensor is not None:
                on_tensor(name, sum(i.nbytes for i in infos.values() if i is not None))
    extra = [n for src in (b, base) if src for n in src.tensors if n not in a.tensors]
    result.skipped += [f"{n}: not in A" for n in dict.fromkeys(extra)]
    return result


def diff_bytes(a: ModelSource, b: ModelSource, base: ModelSource | None) -> int:
    """Bytes ``diff_models`` reads at most (for a progress bar's total)."""
    total = 0
    for name, info in a.tensors.items():
        total += info.nbytes + sum(src.tensors[name].nbytes for src in (b, base) if src and name in src.tensors)
    return total


# ------------------------------------------------------------------------------------------ output


def short_labels(modules: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each module name (without ``.weight``) that is still unique:
    ``self_attn.q_proj.weight`` → ``q_proj``, but Qwen v1's ``attn.c_proj`` and ``mlp.c_proj`` stay apart."""
    stripped = {m: m.removesuffix(".weight").split(".") for m in modules}
    out: dict[str, str] = {}
    for m, parts in stripped.items():
        # "bias" alone says nothing: a bias keeps the name of its module.
        for k in range(2 if parts[-1] == "bias" and len(parts) > 1 else 1, len(parts) + 1):
            label = ".".join(parts[-k:])
            clash = [o for o, p in stripped.items() if o != m and ".".join(p[-k:]) == label]
            if not clash or k == len(parts):
                out[m] = label
                break
    return out


def format_value(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    if math.isinf(value):
        return "inf"
    return f"{value:.3g}"


def layer_tables(result: DiffResult) -> list[Table]:
    """One rich table per metric: rows = layers, columns = modules; then the tensors outside layers."""
    modules = result.modules()
    labels = short_labels(modules)
    tables = []
    for metric, title in result.metrics.items():
        table = Table(title=title, title_justify="left")
        table.add_column("layer", justify="right", style="bold")
        for m in modules:
            table.add_column(labels[m], justify="right")
        for label, row in zip(result.layers(), result.grid(metric), strict=True):
            table.add_row(label, *(format_value(v) for v in row))
        tables.append(table)
    others = result.others()
    if others:
        table = Table(title="outside the layers", title_justify="left")
        table.add_column("tensor")
        for title in result.metrics.values():
            table.add_column(title, justify="right")
        for t in others:
            table.add_row(t.name, *(format_value(getattr(t, m)) for m in result.metrics))
        tables.append(table)
    return tables


def long_table(result: DiffResult) -> Table:
    """One row per tensor."""
    table = Table()
    for col in ("layer", "module", "elements"):
        table.add_column(col, justify="right" if col != "module" else "left")
    for title in result.metrics.values():
        table.add_column(title, justify="right")
    for t in result.tensors:
        table.add_row(t.layer or "", t.module, f"{t.numel:,}", *(format_value(getattr(t, m)) for m in result.metrics))
    return table


def write_json(result: DiffResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def plot_heatmap(result: DiffResult, path: Path) -> None:
    """A PNG with one heatmap per metric: x = module, y = layer (layer 0 at the top).

    Uses matplotlib's object API (``Figure`` + Agg canvas), so no global pyplot state or backend
    is touched.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MergekitliteError("--png needs matplotlib: pip install 'mergekitlite[plot]'") from None
    layers, modules = result.layers(), result.modules()
    if not layers:
        raise MergekitliteError("--png: the models have no layer tensors to plot")
    labels = short_labels(modules)
    metrics = result.metrics
    width = max(4.0, 0.45 * len(modules) + 2.0)
    height = max(3.0, 0.22 * len(layers) + 2.0)
    fig = Figure(figsize=(width * len(metrics), height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (metric, title) in zip(axes, metrics.items(), strict=True):
        grid = torch.tensor(result.grid(metric), dtype=torch.float64).numpy()
        if metric == "cosine":
            image = ax.imshow(grid, aspect="auto", cmap="coolwarm", vmin=-1.0, vmax=1.0, interpolation="nearest")
        else:
            image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(title)
        ax.set_xticks(range(len(modules)), [labels[m] for m in modules], rotation=90)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("module")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"A = {result.a}   B = {result.b}" + (f"   base = {result.base}" if result.base else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------------------------ command


def cmd_diff(args: argparse.Namespace, console: Console) -> int:
    """``mergekitlite diff A B [--base BASE] [--long] [--png PATH] [--json PATH]``."""
    from mergekitlite.progress import byte_progress

    a, b = open_model(args.a), open_model(args.b)
    base = open_model(args.base) if args.base else None
    progress = byte_progress(console, "comparing", disable=args.quiet)
    with progress:
        task = progress.add_task("diff", total=diff_bytes(a, b, base), tensor="")
        result = diff_models(
            a, b, base, on_tensor=lambda name, nbytes: progress.update(task, advance=nbytes, tensor=name)
        )
    if not result.tensors:
        raise MergekitliteError(f"{args.a} and {args.b} have no tensor in common that can be compared")
    if not args.quiet:
        console.print(
            f"A = {result.a}\nB = {result.b}" + (f"\nbase = {result.base}" if result.base else ""), highlight=False
        )
        for table in [long_table(result)] if args.long else layer_tables(result):
            console.print(table)
        if result.skipped:
            console.print(f"[yellow]not compared ({len(result.skipped)}):[/]", highlight=False)
            for line in result.skipped[:20]:
                console.print(f"  {line}", highlight=False, markup=False)
            if len(result.skipped) > 20:
                console.print(f"  … and {len(result.skipped) - 20} more (see --json)", highlight=False)
    if args.json:
        write_json(result, args.json)
        console.print(f"wrote {args.json}", highlight=False)
    if args.png:
        plot_heatmap(result, args.png)
        console.print(f"wrote {args.png}", highlight=False)
    return 0
