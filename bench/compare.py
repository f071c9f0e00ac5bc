"""Compare two merged checkpoints with each other, and each with an exact float64 reference.

Everything that counts elements lives here: ``Agreement`` (A vs B: bitwise equal, within one ulp,
max/mean |A − B|) and ``Exactness`` (a bf16 result vs the exact value: correctly rounded, or how far
from it and why). Distances are counted in ulps of the tensors' dtype: two values are ``k`` ulps
apart when ``k - 1`` representable values lie between them (±0 are the same value). Tensors are read
in row blocks with ``safe_open(...).get_slice``, so memory stays small whatever the model size; a
reference that is not elementwise (top-k thresholds, norms) gets whole tensors.

    python bench/compare.py OUT_A OUT_B --recipe RECIPE --exact all   # RECIPE: what both merged
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Collection, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

BLOCK_ELEMENTS = 8 * 1024 * 1024


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index if there is one, else from every file's keys."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / fname for name, fname in weight_map.items()}
    found: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            found.update(dict.fromkeys(f.keys(), path))
    return found


class Reader(ExitStack):
    """Tensors (or row blocks of them) by (model folder, name); file handles stay open until close()."""

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[Path, dict[str, Path]] = {}
        self.handles: dict[Path, Any] = {}

    def names(self, folder: Path) -> dict[str, Path]:
        if folder not in self.files:
            self.files[folder] = tensor_files(folder)
        return self.files[folder]

    def slice(self, folder: Path, name: str) -> Any:
        path = self.names(folder)[name]
        if path not in self.handles:
            self.handles[path] = self.enter_context(safe_open(path, "pt"))
        return self.handles[path].get_slice(name)

    def get(self, folder: Path, name: str, rows: slice | None = None) -> torch.Tensor:
        sl = self.slice(folder, name)
        return sl[:] if rows is None else sl[rows]


def row_slices(shape: list[int]) -> Iterator[slice | None]:
    """Row ranges of at most BLOCK_ELEMENTS elements; None = the whole (0-d or 1-d) tensor."""
    if len(shape) < 2:
        yield None
        return
    row = max(1, BLOCK_ELEMENTS // max(1, int(torch.tensor(shape[1:]).prod())))
    for start in range(0, shape[0], row):
        yield slice(start, min(shape[0], start + row))


# ---------------------------------------------------------------- distances in ulps
_INT = {2: torch.int16, 4: torch.int32}


def ordered_key(t: torch.Tensor) -> torch.Tensor:
    """Float bits -> integers whose differences are distances in ulps (sign-magnitude to two's complement)."""
    width = 8 * t.element_size()
    bits = t.contiguous().view(_INT[t.element_size()]).to(torch.int64) & ((1 << width) - 1)
    sign = 1 << (width - 1)
    mag = bits & (sign - 1)
    return torch.where(bits >= sign, -mag, mag)


def from_key(key: torch.Tensor) -> torch.Tensor:
    """Inverse of ordered_key for bf16: ordered integers → bf16 values."""
    bits = torch.where(key < 0, (-key) | 0x8000, key)
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.bfloat16)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """float64 → bf16, correctly rounded (nearest, ties to even). torch's ``.to(bfloat16)`` goes through
    float32, and that double rounding is wrong for ~1 in 65,000 values that need more than 24 bits
    (e.g. (7δ₂ + 5δ₃)/12) — the very level of the differences measured here. Normal range only."""
    drop = 52 - 7  # float64 mantissa bits below bf16's 7
    bits = x.to(torch.float64).contiguous().view(torch.int64)
    bits = bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)  # carries into the exponent as needed
    bits = bits & ~((1 << drop) - 1)
    return bits.view(torch.float64).to(torch.float32).to(torch.bfloat16)  # both conversions now exact


@dataclass
class Agreement:
    """How far ``a`` is from ``b`` (same dtype)."""

    elements: int = 0
    bitwise_equal: int = 0
    within_1ulp: int = 0
    max_ulps: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if not a.numel():
            return
        ulps = (ordered_key(a) - ordered_key(b)).abs()
        diff = (a.double() - b.double()).abs()
        self.elements += a.numel()
        self.bitwise_equal += int((ulps == 0).sum())
        self.within_1ulp += int((ulps <= 1).sum())
        self.max_ulps = max(self.max_ulps, int(ulps.max()))
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())

    def summary(self) -> dict[str, float]:
        n = max(1, self.elements)
        return {
            "elements": self.elements,
            "bitwise_equal_frac": self.bitwise_equal / n,
            "within_1ulp_frac": self.within_1ulp / n,
            "max_ulps": self.max_ulps,
            "max_abs": self.max_abs,
            "mean_abs": self.sum_abs / n,
        }


@dataclass
class Exactness:
    """A result, rounded to bf16, against the exact value (float64): correctly rounded, or how far from it.
    An exact tie (the exact value halfway between two bf16 values) rounds to even; a result on the other
    side of a tie is counted apart, since any float32 rounding of the operands decides such a tie."""

    elements: int = 0
    correct: int = 0
    ties: int = 0  # exact value is a bf16 midpoint
    wrong_at_tie: int = 0
    wrong_1ulp: int = 0  # one bf16 value off, not at a tie
    cancellation: int = 0  # ≥ 2 off, but by less than 4 float32 ulps of the largest operand (a result ≪ its inputs)
    wrong_more: int = 0  # ≥ 2 off beyond that
    max_vs_rounded: float = 0.0  # the error beyond the unavoidable final rounding
    max_abs: float = 0.0
    sum_abs: float = 0.0
    sum_sq: float = 0.0

    def add(self, got: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor) -> None:
        """``scale``: per element, the largest |input| the result was computed from."""
        if not got.numel():
            return
        got = got.to(torch.bfloat16)
        rounded = round_bf16(exact)
        below = exact - rounded.double()
        neighbour = from_key(ordered_key(rounded) + below.sign().to(torch.int64))
        tie = (below != 0) & ((rounded.double() + neighbour.double()) / 2 == exact)
        off = (ordered_key(got) - ordered_key(rounded)).abs()
        err = (got.double() - exact).abs()
        small = err <= scale * 2.0**-21
        self.elements += got.numel()
        self.correct += int((off == 0).sum())
        self.ties += int(tie.sum())
        self.wrong_at_tie += int((tie & (off == 1)).sum())
        self.wrong_1ulp += int((~tie & (off == 1)).sum())
        self.cancellation += int(((off > 1) & small).sum())
        self.wrong_more += int(((off > 1) & ~small).sum())
        self.max_vs_rounded = max(self.max_vs_rounded, float((got.double() - rounded.double()).abs().max()))
        self.max_abs = max(self.max_abs, float(err.max()))
        self.sum_abs += float(err.sum())
        self.sum_sq += float((err * err).sum())

    def merge(self, other: Exactness) -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, max(mine, theirs) if f.name.startswith("max") else mine + theirs)

    def summary(self) -> dict[str, float]:
        n = max(1, self.elements)
        return {
            "elements": self.elements,
            "correctly_rounded_frac": self.correct / n,
            "ties": self.ties,
            "wrong_at_tie": self.wrong_at_tie,
            "wrong_1ulp": self.wrong_1ulp,
            "cancellation": self.cancellation,
            "wrong_more": self.wrong_more,
            "max_vs_rounded": self.max_vs_rounded,
            "max_abs": self.max_abs,
            "mean_abs": self.sum_abs / n,
            "rms": (self.sum_sq / n) ** 0.5,
        }


# ---------------------------------------------------------------- two outputs
class Reference(Protocol):
    """The exact value of one tensor (or of a row block when ``elementwise``) and, per element, the
    largest |input| it is computed from."""

    elementwise: bool

    def __call__(self, name: str, rows: slice | None) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class Report:
    a_name: str
    b_name: str
    missing_in_a: list[str] = field(default_factory=list)
    missing_in_b: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # shape or dtype differs
    tensors: int = 0  # compared
    agreement: Agreement = field(default_factory=Agreement)
    worst_tensor: str = ""  # where a and b differ most (absolute: ulps mislead near 0)
    exact_tensors: list[str] = field(default_factory=list)
    exact_a: Exactness = field(default_factory=Exactness)
    exact_b: Exactness = field(default_factory=Exactness)
    exact_per_tensor: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("agreement", "exact_a", "exact_b"):
            d[key] = getattr(self, key).summary()
        return d


def compare(
    a_dir: Path,
    b_dir: Path,
    reference: Reference | None = None,
    exact: Collection[str] | str = (),
    reader: Reader | None = None,
) -> Report:
    """``a_dir`` vs ``b_dir`` on every tensor; both vs ``reference`` on the ``exact`` tensors ('all' or names).
    Tensors whose dtypes differ (mergekit writes some methods' outputs in float32) are compared after
    casting B to A's dtype, and listed as mismatched."""
    with ExitStack() as stack:
        reader = reader or stack.enter_context(Reader())
        fa, fb = reader.names(a_dir), reader.names(b_dir)
        for folder, found in ((a_dir, fa), (b_dir, fb)):
            if not found:
                raise SystemExit(f"no safetensors tensors in {folder}")
        report = Report(a_dir.name, b_dir.name, sorted(set(fb) - set(fa)), sorted(set(fa) - set(fb)))
        wanted = set() if reference is None else set(fa) if exact == "all" else set(exact)
        for name in sorted(set(fa) & set(fb)):
            sa, sb = reader.slice(a_dir, name), reader.slice(b_dir, name)
            if sa.get_shape() != sb.get_shape():
                report.mismatched.append(
                    f"{name}: {sa.get_shape()} {sa.get_dtype()} vs {sb.get_shape()} {sb.get_dtype()}"
                )
                continue
            if sa.get_dtype() != sb.get_dtype():
                report.mismatched.append(f"{name}: {sa.get_dtype()} vs {sb.get_dtype()} (compared as {sa.get_dtype()})")
            report.tensors += 1
            ea, eb = Exactness(), Exactness()
            before = report.agreement.max_abs
            for rows in row_slices(sa.get_shape()):
                a = reader.get(a_dir, name, rows)
                b = reader.get(b_dir, name, rows).to(a.dtype)
                report.agreement.add(a, b)
                if name in wanted and reference.elementwise:
                    ref, scale = reference(name, rows)
                    ea.add(a, ref, scale)
                    eb.add(b, ref, scale)
            if name in wanted and not reference.elementwise:
                ref, scale = reference(name, None)
                ea.add(reader.get(a_dir, name), ref, scale)
                eb.add(reader.get(b_dir, name), ref, scale)
            if report.agreement.max_abs > before:
                report.worst_tensor = name
            if name in wanted:
                report.exact_per_tensor[name] = {"a": ea.summary(), "b": eb.summary()}
                report.exact_a.merge(ea)
                report.exact_b.merge(eb)
    order = sorted(report.exact_per_tensor) if exact == "all" else exact  # as asked for
    report.exact_tensors = [name for name in order if name in report.exact_per_tensor]
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--recipe", type=Path, help="the recipe both outputs were merged from: the exact reference")
    ap.add_argument("--exact", default="all", help="with --recipe: 'all' or comma-separated tensor names")
    args = ap.parse_args(argv)
    with Reader() as reader:
        reference = None
        if args.recipe:
            from reference import RecipeReference  # the exact definitions of the methods

            reference = RecipeReference(args.recipe, reader)
        exact = "all" if args.exact == "all" else args.exact.split(",")
        report = compare(args.a, args.b, reference, exact, reader)
    print(json.dumps(report.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
