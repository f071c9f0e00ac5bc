"""Check one parity case: our merged checkpoint vs mergekit's, and both vs an exact float64 reference.

Run by bench/parity.py as a child process, untimed (the harness itself must not import torch: Linux
passes its RSS high-water mark on to every later child's ``ru_maxrss``). Everything is read from the
recipe file both tools merged, so the reference sees exactly the parameters they saw:

* **agreement**, every tensor: bitwise equal, within one bf16 ulp, max |ours − mergekit| (bench/compare.py);
* **exact**, a few tensors, deterministic methods: each output against the method's definition computed
  in float64 (bench/reference.py), rounded to bf16 once; misses are split into exact ties, 1 ulp,
  cancellation and the rest (compare.Exactness);
* **random** (DARE/DELLA): the draws differ by construction, so per 2-D tensor we *decode* which task
  vectors each output element kept (the subset S whose candidate value λ·Σ_S sᵢwᵢδᵢ(/Σ_S wᵢ) reproduces
  the bf16 output, else the nearest; ambiguous elements are left out; sᵢ, the L1 rescale factor, is
  estimated from the data), and compare keep rates, keep rates by magnitude quartile (DELLA's ranked
  probabilities), rescale factors and output mean/std.

    python bench/parity_check.py RECIPE --ours OUT_A --mergekit OUT_B --json report.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from compare import Reader, compare, round_bf16
from reference import CONSENSUS, Case, RecipeReference, f64

DEFAULT_EXACT = (  # for the 8-layer preset "medium"; parity.py passes its own list
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.4.mlp.down_proj.weight",
    "model.layers.6.self_attn.k_proj.weight",
    "model.layers.3.post_attention_layernorm.weight",
    "lm_head.weight",
)
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}


# ------------------------------------------------------------------ random methods: decode the masks
@dataclass
class Decoded:
    """Per tool, summed over the 2-D tensors. An element is *resolved* when exactly one subset S of the
    models reproduces its bf16 output (bf16(base + candidate_S) == out), or none does and the nearest
    candidate is taken; it is *ambiguous* when several do (tiny δ, or δ₁ ≈ δ₂), and left out of the keep
    rates, which are therefore rates among resolved elements, for both tools alike."""

    elements: int = 0
    changed: int = 0  # out ≠ base: needs no decoding
    resolved: int = 0
    fit_exact: int = 0  # resolved by an exact reproduction
    kept: list[int] = field(default_factory=list)  # per model
    quartile_resolved: list[list[int]] = field(default_factory=list)  # per model, per |δᵢ| row-rank quartile
    quartile_kept: list[list[int]] = field(default_factory=list)
    scales: list[list[float]] = field(default_factory=list)  # per model, per tensor: estimated rescale factor
    per_tensor_keep: dict[str, list[float]] = field(default_factory=dict)
    sum_y: float = 0.0
    sum_y2: float = 0.0

    def summary(self) -> dict[str, Any]:
        n, r = max(1, self.elements), max(1, self.resolved)
        mean = self.sum_y / n
        return {
            "elements": self.elements,
            "changed_frac": self.changed / n,
            "resolved_frac": self.resolved / n,
            "fit_exact_frac": self.fit_exact / n,
            "keep": [k / r for k in self.kept],
            "keep_by_quartile": [
                [k / max(1, m) for k, m in zip(ks, ms, strict=True)]
                for ks, ms in zip(self.quartile_kept, self.quartile_resolved, strict=True)
            ],
            "scale_median": [sorted(s)[len(s) // 2] if s else None for s in self.scales],
            "scale_min": [min(s) if s else None for s in self.scales],
            "scale_max": [max(s) if s else None for s in self.scales],
            "delta_mean": mean,
            "delta_std": math.sqrt(max(0.0, self.sum_y2 / n - mean * mean)),
            "per_tensor_keep": self.per_tensor_keep,
        }


def row_quartiles(magnitudes: torch.Tensor) -> torch.Tensor:
    """0..3: quartile of each element's rank by magnitude within its row (dim 1, as DELLA ranks; equal
    magnitudes rank by index)."""
    ranks = magnitudes.argsort(dim=1, stable=True).argsort(dim=1)
    return (ranks * 4 // magnitudes.shape[1]).clamp(max=3)


def nearest(cands: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Index of the candidate nearest to y, per element (a loop: argmin over dim 0 is slow on CPU)."""
    best, choice = (cands[0] - y).abs(), torch.zeros_like(y, dtype=torch.int64)
    for k in range(1, cands.shape[0]):
        dist = (cands[k] - y).abs()
        closer = dist < best
        best = torch.where(closer, dist, best)
        choice.masked_fill_(closer, k)
    return choice


def candidates(
    deltas: list[torch.Tensor], w: list[float], scales: list[float], lam: float, normalize: bool, consensus: bool
) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """Every subset S of the models and its output delta λ·Σ_S sᵢwᵢδᵢ (÷ Σ_S wᵢ for TIES, ÷ Σ w for linear)."""
    subsets = [s for r in range(len(deltas) + 1) for s in itertools.combinations(range(len(deltas)), r)]
    values = []
    for s in subsets:
        v = sum((scales[i] * w[i] * deltas[i] for i in s), torch.zeros_like(deltas[0]))
        if normalize:
            divisor = math.fsum(w[i] for i in s) if consensus else math.fsum(w)
            v = v / (divisor if divisor != 0 else 1.0)
        values.append(lam * v)
    return subsets, torch.stack(values)


def decode(cands: torch.Tensor, y: torch.Tensor, base: torch.Tensor, got: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(choice, resolved, exact): the subset index per element, where it is unambiguous, where it
    reproduces the output bit for bit."""
    bits = got.view(torch.int16)
    match = torch.stack([round_bf16(base + c).view(torch.int16) == bits for c in cands])
    count = match.sum(0)
    choice = torch.where(count == 1, match.to(torch.int8).argmax(0), nearest(cands, y))
    return choice, count <= 1, count == 1


def decode_tensor(case: Case, reader: Reader, out: Path, name: str, acc: Decoded) -> None:
    base = f64(reader.get(case.base, name))
    got = reader.get(out, name)
    y = f64(got) - base
    deltas = [f64(reader.get(m, name)) - base for m in case.models]
    w, d = case.per_model("weight", name), case.per_model("density", name)
    lam, normalize = float(case.value("lambda", name)), bool(case.value("normalize", name))
    consensus = case.method in CONSENSUS
    scales = [1 / di if case.value("rescale", name) and 0 < di < 1 else 1.0 for di in d]
    # Nearest candidates with sᵢ = 1/dᵢ; re-estimate each sᵢ from the large |δᵢ| that model i alone explains;
    # then the full decode with those.
    subsets, cands = candidates(deltas, w, scales, lam, normalize, consensus)
    choice = nearest(cands, y)
    for i in range(len(deltas)):
        alone = (choice == subsets.index((i,))) & (deltas[i].abs() > deltas[i].abs().median())
        _, unit = candidates([deltas[i]], [w[i]], [1.0], lam, normalize, consensus)
        scales[i] = (y[alone] / unit[1][alone]).median().item() if int(alone.sum()) > 100 else scales[i]
    subsets, cands = candidates(deltas, w, scales, lam, normalize, consensus)
    choice, resolved, exact = decode(cands, y, base, got)
    if not acc.kept:
        acc.kept = [0] * len(deltas)
        acc.quartile_kept = [[0] * 4 for _ in deltas]
        acc.quartile_resolved = [[0] * 4 for _ in deltas]
        acc.scales = [[] for _ in deltas]
    acc.elements += y.numel()
    acc.changed += int((got.view(torch.int16) != base.to(torch.bfloat16).view(torch.int16)).sum())
    acc.resolved += int(resolved.sum())
    acc.fit_exact += int(exact.sum())
    acc.sum_y += y.sum().item()
    acc.sum_y2 += y.square().sum().item()
    keeps = []
    for i in range(len(deltas)):
        kept = torch.zeros_like(resolved)
        for k, sub in enumerate(subsets):
            if i in sub:
                kept |= choice == k
        kept &= resolved
        acc.kept[i] += int(kept.sum())
        quart = row_quartiles(deltas[i].abs())
        for q in range(4):
            acc.quartile_kept[i][q] += int((kept & (quart == q)).sum())
            acc.quartile_resolved[i][q] += int((resolved & (quart == q)).sum())
        acc.scales[i].append(scales[i])
        keeps.append(int(kept.sum()) / max(1, int(resolved.sum())))
    acc.per_tensor_keep[name] = keeps


# ------------------------------------------------------------------ the check
def check(recipe: Path, ours: Path, mk: Path, exact: list[str]) -> dict[str, Any]:
    """compare.Report of ours (a) vs mergekit's (b), with the exact reference where the method has one,
    plus "random": the decoded draws of the random methods."""
    with Reader() as reader:
        reference = RecipeReference(recipe, reader)
        report = compare(ours, mk, reference if reference.defined else None, exact, reader).as_dict()
        report["reference_unverified_elements"] = reference.case.unverified
        if reference.case.method in RANDOM:
            names = sorted(set(reader.names(ours)) & set(reader.names(mk)))
            decoded = {}
            for label, folder in (("ours", ours), ("mergekit", mk)):
                acc = Decoded()
                for name in names:
                    if len(reader.slice(folder, name).get_shape()) == 2:
                        decode_tensor(reference.case, reader, folder, name, acc)
                decoded[label] = acc.summary()
            report["random"] = decoded
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--ours", type=Path, required=True)
    ap.add_argument("--mergekit", type=Path, required=True)
    ap.add_argument("--exact", default=",".join(DEFAULT_EXACT), help="comma-separated tensor names")
    ap.add_argument("--json", type=Path, help="write the report here (default: stdout)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (untimed, between timed runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = json.dumps(check(args.recipe, args.ours, args.mergekit, args.exact.split(",")), indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
