"""Top-k ties on real bf16 deltas: where our TIES / Breadcrumbs / SCE masks differ from mergekit 0.1.5's, why,
and what that does to the merged tensor (README "Top-k.", project issue 10).

Fine-tunes stored in bf16 differ from their base by a few bf16 ulps of the base, so |δ| takes few distinct
values and many elements tie at a top-k threshold. Both tools keep exactly k; they differ in which tied
elements they keep. For a sample of tensors of a family (every kind of a Llama: q/k/v/o, gate/up/down, the
norms, embed_tokens, lm_head; ``--layers``) and densities of published configs, it computes:

* ours: the masks of mergekitlite's own statistic (``compute_stats`` with the method's spec, then the
  sparsifier's / selector's mask), checked against the definition (the k largest |δ| of the exact float32
  δ, equal magnitudes: lowest flat index first; SCE: the float32-rounded variance);
* mergekit's: made by mergekit's own functions in its venv (bench/tiebreak_mergekit.py), on the bf16 δ of
  a bf16 merge;
* "bf16-def": our definition applied to what mergekit ranks (|δ| of the bf16 δ; SCE: its bf16 variance
  and its k), which splits a difference into the part due to ranking rounded values (ours vs bf16-def)
  and the part due to tie order (mergekit vs bf16-def: its sort leaves equal keys in no set order);
* the merged tensor (bf16) through our arithmetic, once with our masks and once with mergekit's, so that
  only the masks differ (the recipes' weights: TIES 1.0/0.7 normalized, Breadcrumbs 1.0/0.5).

    .venv/bin/python bench/tiebreak.py                       # 1.3b family, layers 0 and 23; appends to RESULTS.md
    .venv/bin/python bench/tiebreak.py --layers 0 --no-embed --no-write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tiebreak_mergekit import MODELS, load_family_tensor
from torch import Tensor

from mergekitlite.methods import REGISTRY
from mergekitlite.methods.apply import compute_stats
from mergekitlite.methods.registry import ChunkInfo, tensor_rows
from mergekitlite.methods.sparsify import SceStats, SparseStats, mix, sce, sparse_deltas, variance_key

BENCH = Path(__file__).resolve().parent
WORK = BENCH / ".work"
DEFAULT_FAMILY = WORK / "1.3b"
WORKER = BENCH / "tiebreak_mergekit.py"
KINDS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
)
# The recipes' weights (bench/.work/1.3b/recipes): the merged-tensor comparison uses them.
MIX = {"ties": ((1.0, 0.7), True, True), "breadcrumbs": ((1.0, 0.5), False, False)}  # weights, consensus, normalize


@dataclass(frozen=True)
class Job:
    method: str  # ties | breadcrumbs | sce
    density: float  # density, or SCE's select_topk
    gamma: float = 0.0

    @property
    def name(self) -> str:
        extra = f" γ {self.gamma:g}" if self.method == "breadcrumbs" else ""
        what = "select_topk" if self.method == "sce" else "density"
        return f"{self.method} {what} {self.density:g}{extra}"

    @property
    def slug(self) -> str:
        return f"{self.method}-{self.density:g}-{self.gamma:g}"


JOBS = (
    Job("ties", 0.5),
    Job("ties", 0.7),
    Job("breadcrumbs", 0.9, 0.01),
    Job("sce", 0.1),
    Job("sce", 0.5),
)


# ---------------------------------------------------------------- the definition
def top_mask(key: Tensor, k: int) -> tuple[Tensor, float | None]:
    """The k largest of a flat float tensor, equal values: lowest index first; and the k-th largest value
    (the threshold; None when k is 0 or n). Linear time: the threshold by selection, then a running count
    of the values equal to it."""
    n = key.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k > 0, dtype=torch.bool), None
    threshold = torch.kthvalue(key, n - k + 1).values
    above = key > threshold
    needed = k - int(above.sum())
    equal = key == threshold
    first = torch.cumsum(equal, 0, dtype=torch.int32) <= needed
    return above | (equal & first), float(threshold)


def window(method: str, n: int, density: float, gamma: float) -> tuple[int, int]:
    """[lo, hi) in descending rank order, by mergekit's arithmetic (``magnitude``: k = max(1, ⌊d·n⌋);
    ``magnitude_outliers``: keep ⌊d·n⌋ after dropping ⌊γ·n⌋ of the largest, fewer when they do not fit)."""
    if method == "ties":
        return 0, max(1, int(density * n))
    keep, n_top = int(density * n), int(gamma * n)
    n_bottom = max(0, n - keep - n_top)
    return n - n_bottom - keep, n - n_bottom


def window_mask(key: Tensor, lo: int, hi: int) -> tuple[Tensor, list[float]]:
    """Ranks [lo, hi) by ``top_mask``'s order, and the threshold values at its two ends."""
    upper, t_hi = top_mask(key, hi)
    thresholds = [t for t in (t_hi,) if t is not None]
    if lo == 0:
        return upper, thresholds
    dropped, t_lo = top_mask(key, lo)
    # The lower end's class: the values equal to the largest kept one (rank lo), split with rank lo - 1.
    if t_lo is not None:
        thresholds.append(float(key[upper & ~dropped].max()))
    return upper & ~dropped, thresholds


def tie_count(key: Tensor, thresholds: Sequence[float]) -> tuple[int, Tensor]:
    """Elements equal to a threshold value (each class counted once), and where they are."""
    at = torch.zeros_like(key, dtype=torch.bool)
    for t in set(thresholds):
        at |= key == t
    return int(at.sum()), at


# ---------------------------------------------------------------- our code's masks
class FixedMask:
    """A sparsifier that hands out a given mask (int32: -1 keep, 0 drop), to run our mixing with any mask."""

    def __init__(self, keep: Tensor) -> None:
        self.keep = keep.to(torch.int32).neg_()

    def keep_mask(self, delta: Tensor, chunk: ChunkInfo, magnitude: Tensor | None = None) -> Tensor:
        return self.keep.reshape(delta.shape)


class FixedSelector:
    """SCE's selector with a given mask."""

    def __init__(self, keep: Tensor) -> None:
        self.keep = keep.to(torch.int32).neg_()

    def masks(self, keys: Tensor, row_start: int, rows: int) -> list[Tensor]:
        return [self.keep.reshape(keys.shape)]


def whole_chunk(shape: tuple[int, ...]) -> ChunkInfo:
    return ChunkInfo(0, tensor_rows(shape), shape, 0)


def our_stats(method: str, params: dict[str, Any], base: Tensor, models: list[Tensor]) -> Any:
    """The method's statistic over the whole tensor as one chunk (chunking gives the same bits: tests)."""
    shape = tuple(base.shape)
    return compute_stats(
        REGISTRY.methods[method], shape, params, len(models), [whole_chunk(shape)], lambda c: (base, models)
    )


def our_masks(job: Job, base: Tensor, models: list[Tensor]) -> list[Tensor]:
    """mergekitlite's masks (bool, flat): one per model, SCE one for all."""
    chunk = whole_chunk(tuple(base.shape))
    if job.method == "sce":
        stats = our_stats("sce", {"select_topk": job.density, "int8_mask": False}, base, models)
        keep = stats.selector.masks(variance_key([m - base for m in models]), 0, chunk.row_end)[0]
        return [torch.ones(base.numel(), dtype=torch.bool) if keep is None else keep.reshape(-1) != 0]
    count = len(models)
    params = {"density": [job.density] * count, "gamma": [job.gamma] * count, "rescale": False}
    stats = our_stats(job.method, params, base, models)
    return [(s.keep_mask(m - base, chunk) != 0).reshape(-1) for s, m in zip(stats.sparsifiers, models, strict=True)]


def merged(job: Job, base: Tensor, models: list[Tensor], masks: list[Tensor]) -> Tensor:
    """The bf16 merged tensor by our arithmetic with the given masks (SCE: weights from the masked δ)."""
    chunk = whole_chunk(tuple(base.shape))
    if job.method == "sce":
        energy = [float(((m - base).double().reshape(-1) * masks[0]).square().mean()) for m in models]
        total = sum(energy)
        weights = tuple(1.0 / len(models) for _ in models) if abs(total) < 1e-6 else tuple(e / total for e in energy)
        stats_sce = SceStats(FixedSelector(masks[0]), weights)  # type: ignore[arg-type]
        return sce(base, models, chunk=chunk, stats=stats_sce).to(torch.bfloat16)
    weight, consensus, normalize = MIX[job.method]
    stats = SparseStats(tuple(FixedMask(m) for m in masks), (None,) * len(models))  # type: ignore[arg-type]
    deltas = sparse_deltas(base, models, weight, stats, chunk)
    return mix(deltas, weight, consensus=consensus, normalize=normalize).add_(base).to(torch.bfloat16)


# ---------------------------------------------------------------- one tensor
@dataclass
class Loaded:
    name: str
    base16: Tensor
    models16: list[Tensor]

    @property
    def base(self) -> Tensor:
        return self.base16.float()

    @property
    def models(self) -> list[Tensor]:
        return [m.float() for m in self.models16]


def rank_keys(job: Job, t: Loaded) -> tuple[list[Tensor], list[Tensor], int | None]:
    """What each tool ranks, flat float32: the exact |δ| (ours) and the bf16 |δ| (mergekit), one per model;
    SCE: the variance in float32 (ours) and in bf16 (mergekit), and mergekit's k."""
    exact = [(m - t.base).reshape(-1) for m in t.models]
    rounded = [(m - t.base16).reshape(-1) for m in t.models16]  # bf16 - bf16 in bf16, as mergekit
    if job.method != "sce":
        return [d.abs() for d in exact], [d.abs().float() for d in rounded], None
    var32 = torch.var(torch.stack(exact).double(), dim=0, unbiased=False).float()
    var16 = torch.var(torch.stack(rounded), dim=0, unbiased=False)
    return [var32], [var16.float()], int(int(torch.count_nonzero(var16)) * job.density)


def definition(job: Job, key: Tensor, k_sce: int | None = None) -> tuple[Tensor, list[float]]:
    n = key.numel()
    if job.method == "sce":
        k = int(int(torch.count_nonzero(key)) * job.density) if k_sce is None else k_sce
        mask, t = top_mask(key, k)
        return mask, [] if t is None else [t]
    return window_mask(key, *window(job.method, n, job.density, job.gamma))


def load_mk(work: Path, name: str, job: Job, i: int, n: int) -> Tensor:
    stem = f"{name}__{job.slug}__{i}"
    bits = np.load(work / f"{stem}.npy")
    (work / f"{stem}.npy").unlink()
    (work / f"{stem}.json").unlink()
    return torch.from_numpy(np.unpackbits(bits, count=n).astype(bool))


def compare_masks(job: Job, t: Loaded, work: Path) -> tuple[dict[str, int], list[Tensor], list[Tensor]]:
    """Counts for one tensor and job, summed over the masks (one per model; SCE one), and both tools' masks."""
    ours = our_masks(job, t.base, t.models)
    exact, rounded, k_mk = rank_keys(job, t)
    mks = [load_mk(work, t.name, job, i, t.base16.numel()) for i in range(len(ours))]
    keys = ("n", "def_mismatch", "tied_exact", "tied_bf16", "differ", "differ_zero", "outside_bf16_class")
    c = dict.fromkeys((*keys, "outside_not_rounding", "rounding", "tie_order"), 0)
    zeros = [(m == t.base16).reshape(-1) for m in t.models16]  # δ = 0: keeping it or not changes nothing
    if job.method == "sce":
        zeros = [torch.stack(zeros).all(0)]
    for mine, theirs, e, r, zero in zip(ours, mks, exact, rounded, zeros, strict=True):
        by_def, t_exact = definition(job, e)
        bf16_def, t_bf16 = definition(job, r, k_mk)
        differ = mine != theirs
        tied16, in_class = tie_count(r, t_bf16)
        c["n"] += e.numel()
        c["def_mismatch"] += int((mine != by_def).sum())
        c["tied_exact"] += tie_count(e, t_exact)[0]
        c["tied_bf16"] += tied16
        c["differ"] += int(differ.sum())
        c["differ_zero"] += int((differ & zero).sum())
        c["outside_bf16_class"] += int((differ & ~in_class).sum())
        c["rounding"] += int((mine != bf16_def).sum())
        c["outside_not_rounding"] += int((differ & ~in_class & (mine == bf16_def)).sum())
        c["tie_order"] += int((theirs != bf16_def).sum())
    return c, ours, mks


def ulp_at(x: float) -> float:
    """The bf16 ulp at magnitude x (x = m·2^e with m in [0.5, 1): the ulp is 2^(e − 8))."""
    return float(torch.ldexp(torch.tensor(1.0), torch.frexp(torch.tensor(x)).exponent - 8))


def compare_merged(job: Job, t: Loaded, ours: list[Tensor], mks: list[Tensor]) -> dict[str, float]:
    """The merged tensors with both masks; differences also in bf16 ulps at the tensor's RMS (per-element
    ulps would make any change to a near-zero output look huge)."""
    base, models = t.base, t.models
    diff = (merged(job, base, models, ours).float() - merged(job, base, models, mks).float()).abs()
    ulp = ulp_at(float(base.double().square().mean().sqrt()))
    return {
        "merged_changed": int((diff > 0).sum()),
        "merged_max_abs": float(diff.max()),
        "merged_abs_sum": float(diff.double().sum()),
        "merged_max_ulps": float(diff.max()) / ulp,
        "merged_ulps_sum": float(diff.double().sum()) / ulp,
    }


def tensor_names(layers: Sequence[int], embed: bool, lm_head: bool) -> list[str]:
    names = [f"model.layers.{i}.{kind}.weight" for i in layers for kind in KINDS] + ["model.norm.weight"]
    return names + ["model.embed_tokens.weight"] * embed + ["lm_head.weight"] * lm_head


def kind_of(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if parts[1] == "layers" else ".".join(parts[:-1])


# ---------------------------------------------------------------- running and reporting
def run_worker(args: argparse.Namespace, names: list[str], work: Path) -> None:
    jobs = [{"name": j.slug, "method": j.method, "density": j.density, "gamma": j.gamma} for j in JOBS]
    cmd = [str(args.mergekit_python), str(WORKER), "--family", str(args.family), "--tensors", ",".join(names)]
    cmd += ["--jobs", json.dumps(jobs), "--out", str(work), "--threads", str(args.threads)]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(BENCH)})


def measure(args: argparse.Namespace, names: list[str], work: Path) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        base16, *models16 = (load_family_tensor(args.family, m, name) for m in MODELS)
        t = Loaded(name, base16, models16)
        for job in JOBS:
            counts, ours, mks = compare_masks(job, t, work)
            rows.append({"tensor": name, "job": job.name, **counts, **compare_merged(job, t, ours, mks)})
        print(f"measured {name}", flush=True)
    return rows


def pct(a: float, b: float) -> str:
    return f"{100 * a / b:.2f}%" if b else "–"


def job_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| method | masks × elements | tied at the threshold, exact \\|δ\\| (ours) | tied, bf16 \\|δ\\| (mergekit) "
        "| masks differ | of which δ = 0 | outside mergekit's tie class | from bf16 rounding | from tie order "
        "| merged elements changed | max abs diff | mean abs diff where changed | the same in ulps at the RMS: max "
        "| mean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for job in JOBS:
        mine = [r for r in rows if r["job"] == job.name]
        s = {k: sum(r[k] for r in mine) for k in mine[0] if isinstance(mine[0][k], int | float)}
        elements = s["n"] // (1 if job.method == "sce" else 2)
        changed = max(1, s["merged_changed"])
        out.append(
            f"| {job.name} | {s['n']:,} | {pct(s['tied_exact'], s['n'])} | {pct(s['tied_bf16'], s['n'])} "
            f"| **{pct(s['differ'], s['n'])}** | {pct(s['differ_zero'], s['differ'])} | {s['outside_bf16_class']} "
            f"| {pct(s['rounding'], s['n'])} | {pct(s['tie_order'], s['n'])} | {pct(s['merged_changed'], elements)} "
            f"| {max(r['merged_max_abs'] for r in mine):.3g} | {s['merged_abs_sum'] / changed:.3g} "
            f"| {max(r['merged_max_ulps'] for r in mine):.3g} | {s['merged_ulps_sum'] / changed:.3g} |"
        )
    return out


def kind_table(rows: list[dict[str, Any]]) -> list[str]:
    """Share of mask elements that differ where δ ≠ 0, per tensor kind and job."""
    out = [
        "Masks differ where δ ≠ 0 (a differing mask on a zero δ changes nothing), by tensor kind:",
        "",
        "| tensor | elements | " + " | ".join(j.name for j in JOBS) + " |",
        "|---|---:|" + "---:|" * len(JOBS),
    ]
    kinds: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        kinds.setdefault(kind_of(r["tensor"]), []).append(r)
    for kind, rs in kinds.items():
        cells = []
        for job in JOBS:
            mine = [r for r in rs if r["job"] == job.name]
            n = sum(r["n"] for r in mine)
            cells.append(pct(sum(r["differ"] - r["differ_zero"] for r in mine), n))
        size = sum(r["n"] for r in rs if r["job"] == JOBS[-1].name)
        out.append(f"| {kind} | {size:,} | " + " | ".join(cells) + " |")
    return out


def report(args: argparse.Namespace, names: list[str], rows: list[dict[str, Any]], started: str, took: float) -> str:
    mismatch = sum(r["def_mismatch"] for r in rows)
    outside = sum(r["outside_not_rounding"] for r in rows)
    head = [
        f"## {started} — top-k ties: our masks vs mergekit's, {args.family.name} family (`bench/tiebreak.py`)",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in sys.argv)}`; took {took / 60:.1f} min",
        f"- inputs: {args.family.name} family (bf16 base + 2 fine-tunes), {len(names)} tensors: layers "
        f"{','.join(map(str, args.layers))} × ({', '.join(KINDS)}), {', '.join(n for n in names if 'layers' not in n)}",
        f"- ours = mergekitlite's statistic and masks; they equal the definition (k largest exact \\|δ\\|, lowest "
        f"index first; SCE: float32 variance) on every mask: {mismatch} elements differ",
        "- mergekit 0.1.5's masks from its own `sparsify` / `sce_mask` on the bf16 δ of a bf16 merge (its venv); "
        f"differences outside its tie class that bf16 rounding does not explain: {outside}",
        "- masks × elements: TIES/Breadcrumbs one mask per fine-tune, SCE one per tensor. *tied*: elements whose "
        "ranked value equals a threshold value (the smallest kept; Breadcrumbs also the largest kept). *outside "
        "mergekit's tie class*: differing elements whose bf16 value is not a threshold value. *from bf16 rounding*: "
        "ours vs our definition applied to mergekit's keys and k; *from tie order*: mergekit vs that. The merged "
        "tensors both come from our arithmetic, with our masks and with mergekit's (TIES 1.0/0.7 normalized, "
        "Breadcrumbs 1.0/0.5; SCE's weights from each mask's energy); ulps: bf16 ulps at the tensor's RMS.",
        "",
    ]
    tables = [*job_table(rows), "", *kind_table(rows), ""]
    return "\n".join(head + tables)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", type=Path, default=DEFAULT_FAMILY, help="a make_family.py family (read only)")
    ap.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 23])
    ap.add_argument("--no-embed", action="store_true", help="leave out embed_tokens (65M elements at 1.3b)")
    ap.add_argument("--lm-head", action="store_true", help="add lm_head (as large as embed_tokens)")
    ap.add_argument("--mergekit-python", type=Path, default=Path("/work/mkvenv/bin/python"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.perf_counter()
    names = tensor_names(args.layers, not args.no_embed, args.lm_head)
    work = WORK / "tiebreak" / f"masks-{os.getpid()}"
    run_worker(args, names, work)
    rows = measure(args, names, work)
    work.rmdir()
    section = report(args, names, rows, started, time.perf_counter() - t0)
    raw = WORK / "results" / f"tiebreak-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(rows, indent=1) + "\n")
    print("\n" + section + f"\nraw results: {raw}")
    if not args.no_write:
        with open(args.results, "a") as f:
            f.write("\n" + section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
