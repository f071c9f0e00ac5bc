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

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from mergekitlite.budget import CACHE_CHUNK_ELEMENTS
from mergekitlite.io.files import InputFiles
from mergekitlite.io.safetensors_header import FLOAT_CODES, TensorInfo
from mergekitlite.roles import before_layers, split_layer
from mergekitlite.rowscan import read_rows, row_ranges
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

    def before(self) -> list[TensorDelta]:
        """Tensors outside the layers that come before them (embeddings and their norms)."""
        return [t for t in self.others() if before_layers(t.name)]

    def after(self) -> list[TensorDelta]:
        """Tensors outside the layers that come after them (final norm, output head)."""
        return [t for t in self.others() if not before_layers(t.name)]

    def identical(self) -> bool:
        """Every compared tensor of A equals B (without a base) or both deltas are zero (with one)."""
        return bool(self.tensors) and all(t.rel_a == 0.0 and (t.rel_b is None or t.rel_b == 0.0) for t in self.tensors)

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


# ------------------------------------------------------------------------------------------ measuring


def tensor_sums(
    files: InputFiles, ref: TensorInfo, others: Sequence[TensorInfo], chunk_elements: int = CACHE_CHUNK_ELEMENTS
) -> tuple[float, list[list[float]]]:
    """``(‖r‖², G)`` with ``G[i][j] = (x_i − r)·(x_j − r)`` for the tensors ``others``, reference ``r``.

    Sums are float64 dot products over row chunks; each chunk's partial sum is exact to float64
    rounding, so the result matches a float64 computation over the full tensors.
    """
    rr = 0.0
    gram = [[0.0] * len(others) for _ in others]
    for first, count in row_ranges(ref, chunk_elements):
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
