"""Compare two merged bf16 checkpoints with each other and with the exact (float64) task-arithmetic result.

Tensors are read one row block at a time with ``safe_open(...).get_slice``, so memory stays small
whatever the model size. Distances are counted in bf16 ulps: two bf16 values are ``k`` ulps apart
when ``k - 1`` representable values lie between them (±0 are the same value).

    python bench/compare.py OUT_A OUT_B --family bench/.work/1.3b --weights 1 1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def ordered_key(t: torch.Tensor) -> torch.Tensor:
    """bf16 bits -> integers whose differences are distances in ulps (sign-magnitude to two's complement)."""
    bits = t.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    mag = bits & 0x7FFF
    return torch.where(bits >= 0x8000, -mag, mag)


@dataclass
class Agreement:
    """How far ``a`` is from ``b``, both bf16."""

    elements: int = 0
    bitwise_equal: int = 0
    within_1ulp: int = 0
    max_ulps: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        ulps = (ordered_key(a) - ordered_key(b)).abs()
        diff = (a.double() - b.double()).abs()
        self.elements += a.numel()
        self.bitwise_equal += int((ulps == 0).sum())
        self.within_1ulp += int((ulps <= 1).sum())
        self.max_ulps = max(self.max_ulps, int(ulps.max()) if a.numel() else 0)
        self.max_abs = max(self.max_abs, float(diff.max()) if a.numel() else 0.0)
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
class ExactError:
    """Error of a bf16 result against the exact float64 value; 'correctly rounded' = equal to exact→bf16."""

    elements: int = 0
    correctly_rounded: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    sum_sq: float = 0.0
    max_vs_rounded: float = 0.0  # the error beyond the unavoidable final rounding

    def add(self, got: torch.Tensor, exact: torch.Tensor) -> None:
        err = (got.double() - exact).abs()
        rounded = exact.to(torch.bfloat16)
        self.elements += got.numel()
        self.correctly_rounded += int((got.view(torch.int16) == rounded.view(torch.int16)).sum())
        if got.numel():
            self.max_vs_rounded = max(self.max_vs_rounded, float((got.double() - rounded.double()).abs().max()))
        self.max_abs = max(self.max_abs, float(err.max()) if got.numel() else 0.0)
        self.sum_abs += float(err.sum())
        self.sum_sq += float((err * err).sum())

    def summary(self) -> dict[str, float]:
        n = max(1, self.elements)
        return {
            "elements": self.elements,
            "correctly_rounded_frac": self.correctly_rounded / n,
            "max_abs": self.max_abs,
            "mean_abs": self.sum_abs / n,
            "rms": (self.sum_sq / n) ** 0.5,
            "max_vs_rounded": self.max_vs_rounded,
        }


@dataclass
class Report:
    a_name: str
    b_name: str
    missing_in_a: list[str] = field(default_factory=list)
    missing_in_b: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # shape or dtype differs
    agreement: Agreement = field(default_factory=Agreement)
    exact_tensors: list[str] = field(default_factory=list)
    exact_a: ExactError = field(default_factory=ExactError)
    exact_b: ExactError = field(default_factory=ExactError)
    worst_tensor: str = ""  # where a and b differ most (in ulps)

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["agreement"] = self.agreement.summary()
        d["exact_a"] = self.exact_a.summary()
        d["exact_b"] = self.exact_b.summary()
        return d


def row_slices(shape: list[int]) -> Iterator[slice | None]:
    """Row ranges of at most BLOCK_ELEMENTS elements; None = the whole (0-d or 1-d small) tensor."""
    if len(shape) < 2:
        yield None
        return
    row = max(1, BLOCK_ELEMENTS // max(1, int(torch.tensor(shape[1:]).prod())))
    for start in range(0, shape[0], row):
        yield slice(start, min(shape[0], start + row))


def _get(handle: object, name: str, rows: slice | None) -> torch.Tensor:
    sl = handle.get_slice(name)  # type: ignore[attr-defined]
    return sl[:] if rows is None else sl[rows]


def compare(
    a_dir: Path, b_dir: Path, family: Path | None = None, weights: tuple[float, ...] = (1.0, 1.0), exact: str = "all"
) -> Report:
    """Compare ``a_dir`` with ``b_dir`` everywhere; against the exact result for ``exact`` tensors
    ('all', 'none', or a comma-separated list of names), computed from ``family``/{base,ft1,ft2}."""
    fa, fb = tensor_files(a_dir), tensor_files(b_dir)
    for folder, found in ((a_dir, fa), (b_dir, fb)):
        if not found:
            raise SystemExit(f"no safetensors tensors in {folder}")
    report = Report(a_dir.name, b_dir.name)
    report.missing_in_a = sorted(set(fb) - set(fa))
    report.missing_in_b = sorted(set(fa) - set(fb))
    fams = {m: tensor_files(family / m) for m in ("base", "ft1", "ft2")} if family else {}
    wanted = set(fa) if exact == "all" else set() if exact == "none" else set(exact.split(","))
    worst = -1
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def handle(path: Path) -> object:
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, "pt"))
            return handles[path]

        for name in sorted(set(fa) & set(fb)):
            sa, sb = handle(fa[name]).get_slice(name), handle(fb[name]).get_slice(name)
            if sa.get_shape() != sb.get_shape() or sa.get_dtype() != sb.get_dtype():
                report.mismatched.append(name)
                continue
            do_exact = bool(fams) and name in wanted
            if do_exact:
                report.exact_tensors.append(name)
            before = report.agreement.max_ulps
            for rows in row_slices(sa.get_shape()):
                a, b = _get(handle(fa[name]), name, rows), _get(handle(fb[name]), name, rows)
                report.agreement.add(a, b)
                if do_exact:
                    ref = _exact(fams, handle, name, rows, weights)
                    report.exact_a.add(a, ref)
                    report.exact_b.add(b, ref)
            if report.agreement.max_ulps > max(before, worst):
                worst = report.agreement.max_ulps
                report.worst_tensor = name
    return report


def _exact(
    fams: dict[str, dict[str, Path]], handle, name: str, rows: slice | None, weights: tuple[float, ...]
) -> torch.Tensor:
    """base + Σ wᵢ(ftᵢ − base) in float64: exact here (bf16 inputs, small integer weights)."""
    base = _get(handle(fams["base"][name]), name, rows).double()
    total = base.clone()
    for m, w in zip(("ft1", "ft2"), weights, strict=True):
        total += w * (_get(handle(fams[m][name]), name, rows).double() - base)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="compare two merged checkpoints (and the exact result)")
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--family", type=Path, help="folder with base/ft1/ft2 for the exact reference")
    ap.add_argument("--weights", type=float, nargs=2, default=[1.0, 1.0])
    ap.add_argument("--exact", default="all", help="'all', 'none' or comma-separated tensor names")
    args = ap.parse_args(argv)
    report = compare(args.a, args.b, args.family, tuple(args.weights), args.exact)
    print(json.dumps(report.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
