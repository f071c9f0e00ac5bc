"""Method-by-method parity with mergekit: the same YAML through both tools, timed side by side and compared.

For every merge method (mergekit's config names, typical published parameters) a recipe over a generated
bf16 Llama family (bench/parity_family.py: base + three correlated fine-tunes) is merged by ``merge``
and by ``mergekit-yaml``, N rounds interleaved (round r: method by method, the tool that goes first
alternates), each run a separate process measured by bench/procstats.py (wall, CPU, ``wait4`` peak RSS).
In round 1 both outputs are compared by bench/parity_check.py (a child process, untimed): agreement
over every tensor, error against an exact float64 reference on a few tensors (deterministic methods),
decoded keep rates and rescale factors (DARE/DELLA, whose random draws cannot match).

    python bench/parity.py                          # preset small, N=2, appends to bench/RESULTS.md
    python bench/parity.py -n 1 --only ties,slerp --no-write
    python bench/parity.py --preset medium -n 2

Ours runs from a frozen copy of mergekitlite/ (as bench/run_bench.py), since others commit while it runs.
A method mergekit lacks or fails on is reported as skipped, with the reason from its log.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import parity_family
import yaml
from procstats import RunStats, run_measured
from run_bench import (
    MERGE_BIN,
    MERGEKIT_BIN,
    child_env,
    clear_output,
    machine_info,
    probe_code,
    snapshot_code,
    warm_cache,
)
from run_bench import shards as model_shards

BENCH = Path(__file__).resolve().parent
WORK = BENCH / ".work"
RESULTS_MD = BENCH / "RESULTS.md"
TOOLS = ("ours", "mergekit")


# ------------------------------------------------------------------ the recipes
@dataclass(frozen=True)
class Case:
    name: str  # row label and file name
    recipe: dict[str, Any]
    params: str  # what the table shows of the recipe

    @property
    def method(self) -> str:
        return str(self.recipe["merge_method"])


def _models(family: Path, entries: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"model": str(family / m), **({"parameters": p} if p else {})} for m, p in entries]


def cases(family: Path, layers: int) -> list[Case]:
    """One recipe per method; parameters as in published mergekit configs and mergekit's docs."""
    base = str(family / "base")
    cut = layers - 2  # the frankenmerge: ft1's first L−2 layers, then ft2's last L−2

    def gta(
        method: str, params: dict[str, Any], weights: tuple[float, ...], glob: dict[str, Any] | None = None
    ) -> dict:
        models = [(f"ft{i + 1}", {"weight": w, **params}) for i, w in enumerate(weights)]
        recipe: dict[str, Any] = {"merge_method": method, "base_model": base, "models": _models(family, models)}
        if glob:
            recipe["parameters"] = glob
        return recipe | {"dtype": "bfloat16"}

    classic_t = [  # the SLERP example of mergekit's README (self_attn and mlp in opposite directions)
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
    ft = [str(family / f"ft{i}") for i in (1, 2, 3)]
    out = [
        Case(
            "linear",
            {
                "merge_method": "linear",
                "models": _models(family, [(f"ft{i + 1}", {"weight": w}) for i, w in enumerate((0.5, 0.3, 0.2))]),
                "dtype": "bfloat16",
            },
            "3 models, weight 0.5/0.3/0.2 (normalize)",
        ),
        Case(
            "task_arithmetic",
            gta("task_arithmetic", {}, (1.0, 0.5), {"normalize": True, "lambda": 0.8}),
            "weight 1.0/0.5, normalize, λ 0.8",
        ),
        Case(
            "task_arithmetic (gradients + filters)",
            {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "models": [
                    {
                        "model": ft[0],
                        "parameters": {
                            "weight": [
                                {"filter": "self_attn", "value": [0.2, 0.8, 0.5]},
                                {"filter": "mlp", "value": [1.0, 0.4]},
                                {"value": 0.7},
                            ]
                        },
                    },
                    {"model": ft[1], "parameters": {"weight": [0.3, 0.9]}},
                ],
                "parameters": {"lambda": 1.1},
                "dtype": "bfloat16",
            },
            "ft1 weight filtered (self_attn [0.2,0.8,0.5], mlp [1.0,0.4], else 0.7), ft2 [0.3,0.9], λ 1.1",
        ),
        Case(
            "ties",
            gta("ties", {"density": 0.5}, (1.0, 0.7, 0.5), {"normalize": True}),
            "3 models, weight 1.0/0.7/0.5, density 0.5, normalize",
        ),
        Case("dare_linear", gta("dare_linear", {"density": 0.5}, (1.0, 1.0)), "weight 1/1, density 0.5 (rescale)"),
        Case(
            "dare_ties",
            gta("dare_ties", {"density": 0.5}, (0.5, 0.5), {"int8_mask": True}),
            "weight 0.5/0.5, density 0.5, int8_mask (rescale)",
        ),
        Case(
            "breadcrumbs",
            gta("breadcrumbs", {"density": 0.9, "gamma": 0.01}, (1.0, 0.5)),
            "weight 1.0/0.5, density 0.9, γ 0.01",
        ),
        Case(
            "breadcrumbs_ties",
            gta("breadcrumbs_ties", {"density": 0.9, "gamma": 0.01}, (1.0, 0.7, 0.5)),
            "3 models, weight 1.0/0.7/0.5, density 0.9, γ 0.01",
        ),
        Case(
            "della",
            gta("della", {"density": 0.5, "epsilon": 0.1}, (0.5, 0.5), {"lambda": 1.0}),
            "weight 0.5/0.5, density 0.5, ε 0.1 (normalize, rescale)",
        ),
        Case(
            "della_linear",
            gta("della_linear", {"density": 0.5, "epsilon": 0.1}, (0.6, 0.4), {"lambda": 1.0}),
            "weight 0.6/0.4, density 0.5, ε 0.1 (rescale)",
        ),
        Case(
            "slerp",
            {
                "slices": [
                    {
                        "sources": [
                            {"model": base, "layer_range": [0, layers]},
                            {"model": ft[0], "layer_range": [0, layers]},
                        ]
                    }
                ],
                "merge_method": "slerp",
                "base_model": base,
                "parameters": {"t": classic_t},
                "dtype": "bfloat16",
            },
            "base→ft1, slices, t: self_attn [0,.5,.3,.7,1], mlp [1,.5,.7,.3,0], else 0.5",
        ),
        Case(
            "nuslerp",
            {
                "merge_method": "nuslerp",
                "models": _models(family, [("ft1", {"weight": 0.6}), ("ft2", {"weight": 0.4})]),
                "dtype": "bfloat16",
            },
            "ft1/ft2 weight 0.6/0.4, no base (flatten)",
        ),
        Case(
            "multislerp",
            {
                "merge_method": "multislerp",
                "base_model": base,
                "models": _models(family, [(f"ft{i}", {"weight": w}) for i, w in ((1, 0.5), (2, 0.3), (3, 0.2))]),
                "dtype": "bfloat16",
            },
            "base + 3 task vectors, weight 0.5/0.3/0.2",
        ),
        Case(
            "model_stock",
            {
                "merge_method": "model_stock",
                "base_model": base,
                "models": _models(family, [(m, {}) for m in ("ft1", "ft2", "ft3")]),
                "dtype": "bfloat16",
            },
            "base + 3 fine-tunes",
        ),
        Case(
            "sce",
            gta("sce", {}, (1.0, 1.0, 1.0), {"select_topk": 0.1})
            | {"models": _models(family, [(m, {}) for m in ("ft1", "ft2", "ft3")])},
            "base + 3 fine-tunes, select_topk 0.1",
        ),
        Case(
            "karcher",
            {
                "merge_method": "karcher",
                "models": _models(family, [(m, {}) for m in ("ft1", "ft2", "ft3")]),
                "parameters": {"max_iter": 10, "tol": 1e-5},
                "dtype": "bfloat16",
            },
            "3 models, no base, max_iter 10, tol 1e-5",
        ),
        Case(
            "nearswap",
            {
                "merge_method": "nearswap",
                "base_model": base,
                "models": _models(family, [("ft1", {})]),
                "parameters": {"t": 0.0001},
                "dtype": "bfloat16",
            },
            "base + ft1, t 0.0001",
        ),
        Case(
            "ram",
            {
                "merge_method": "ram",
                "base_model": base,
                "models": _models(family, [(m, {}) for m in ("ft1", "ft2", "ft3")]),
                "parameters": {"epsilon": 0.001},
                "dtype": "bfloat16",
            },
            "base + 3 fine-tunes, ε 0.001 (about half of each δ counts)",
        ),
        Case(
            "ramplus_tl",
            {
                "merge_method": "ramplus_tl",
                "base_model": base,
                "models": _models(family, [(m, {}) for m in ("ft1", "ft2", "ft3")]),
                "parameters": {"epsilon": 0.001, "r": 0.1, "alpha": 0.2},
                "dtype": "bfloat16",
            },
            "base + 3 fine-tunes, ε 0.001, r 0.1, α 0.2",
        ),
        Case(
            "arcee_fusion",
            {
                "merge_method": "arcee_fusion",
                "base_model": base,
                "models": _models(family, [("ft1", {})]),
                "dtype": "bfloat16",
            },
            "base + ft1",
        ),
        Case(
            "passthrough (slices)",
            {
                "slices": [
                    {"sources": [{"model": ft[0], "layer_range": [0, cut]}]},
                    {"sources": [{"model": ft[1], "layer_range": [layers - cut, layers]}]},
                ],
                "merge_method": "passthrough",
                "dtype": "bfloat16",
            },
            f"frankenmerge: ft1 layers 0–{cut - 1} + ft2 layers {layers - cut}–{layers - 1} ({2 * cut} layers)",
        ),
    ]
    return out


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")


# ------------------------------------------------------------------ running
@dataclass
class Outcome:
    runs: dict[str, list[RunStats]] = field(default_factory=lambda: {t: [] for t in TOOLS})
    skipped: dict[str, str] = field(default_factory=dict)  # tool -> why
    check: dict[str, Any] | None = None
    check_error: str = ""


def tool_cmd(tool: str, args: argparse.Namespace, recipe: Path, out: Path) -> list[str]:
    if tool == "ours":
        return [
            str(args.merge_bin),
            str(recipe),
            str(out),
            "--overwrite",
            "--no-hash",
            "-q",
            *shlex.split(args.ours_args),
        ]
    return [str(args.mergekit_bin), str(recipe), str(out), "--quiet", *shlex.split(args.mk_args)]


def failure_reason(log: Path) -> str:
    """The last informative line of a failed run's log (the exception, usually)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Exception" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def run_one(
    tool: str, case: Case, args: argparse.Namespace, paths: dict[str, Path], env: dict[str, str], r: int
) -> RunStats:
    out = paths["out"] / f"{slug(case.name)}-{tool}"
    clear_output(out)
    os.sync()  # the previous run's writeback must not land in this one
    log = paths["logs"] / f"{slug(case.name)}-{tool}-{r}.log"
    stats = run_measured(
        f"{case.name} {tool}", tool_cmd(tool, args, paths["recipes"] / f"{slug(case.name)}.yaml", out), log, env=env
    )
    os.sync()
    return stats


def exact_tensors(args: argparse.Namespace) -> list[str]:
    """Tensors checked against the float64 reference: attention and MLP matrices at different depths (different
    gradient values), a norm vector, the largest matrix."""
    n = parity_family.PRESETS[args.preset].layers
    return [
        "model.layers.1.self_attn.q_proj.weight",
        f"model.layers.{n - 2}.mlp.down_proj.weight",
        f"model.layers.{n - 1}.self_attn.k_proj.weight",
        f"model.layers.{n // 2}.post_attention_layernorm.weight",
        "lm_head.weight",
    ]


def run_check(case: Case, args: argparse.Namespace, paths: dict[str, Path], outcome: Outcome) -> None:
    report = paths["checks"] / f"{slug(case.name)}.json"
    cmd = [
        sys.executable,
        str(BENCH / "parity_check.py"),
        str(paths["recipes"] / f"{slug(case.name)}.yaml"),
        "--ours",
        str(paths["out"] / f"{slug(case.name)}-ours"),
        "--mergekit",
        str(paths["out"] / f"{slug(case.name)}-mergekit"),
        "--json",
        str(report),
        "--exact",
        ",".join(exact_tensors(args)),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        outcome.check_error = (done.stderr.strip().splitlines() or ["?"])[-1][:300]
        print(f"  check failed: {outcome.check_error}", flush=True)
        return
    outcome.check = json.loads(report.read_text())


def run_rounds(selected: list[Case], args: argparse.Namespace, paths: dict[str, Path], env: dict[str, str]) -> dict:
    outcomes = {c.name: Outcome() for c in selected}
    for r in range(1, args.repeats + 1):
        for idx, case in enumerate(selected):
            o = outcomes[case.name]
            order = TOOLS if (r + idx) % 2 else TOOLS[::-1]  # alternate who goes first
            for tool in order:
                if tool in o.skipped:
                    continue
                s = run_one(tool, case, args, paths, env, r)
                if s.returncode != 0:
                    o.skipped[tool] = f"exit {s.returncode}: " + failure_reason(
                        Path(paths["logs"] / f"{slug(case.name)}-{tool}-{r}.log")
                    )
                    print(f"round {r} {case.name:40s} {tool:8s} FAILED {o.skipped[tool]}", flush=True)
                    continue
                o.runs[tool].append(s)
                print(
                    f"round {r} {case.name:40s} {tool:8s} {s.wall_s:6.1f} s wall {s.cpu_s:6.1f} s CPU "
                    f"{s.peak_rss / 1e9:5.2f} GB load {s.loadavg_before:.1f}",
                    flush=True,
                )
            if r == 1 and not o.skipped and not args.no_check:
                run_check(case, args, paths, o)
            if not (args.keep_outputs and r == args.repeats):
                for tool in TOOLS:
                    clear_output(paths["out"] / f"{slug(case.name)}-{tool}")
    return outcomes


# ------------------------------------------------------------------ report
def _median(runs: list[RunStats], key: str) -> float:
    return statistics.median(getattr(s, key) for s in runs) if runs else float("nan")


def _pct(x: float) -> str:
    return f"{x * 100:.3f}%" if x < 0.99995 or x == 1 else f"{x * 100:.4f}%"


def timing_table(selected: list[Case], outcomes: dict[str, Outcome]) -> list[str]:
    lines = [
        "| method | recipe | ours wall (s) | mergekit wall (s) | mergekit / ours | ours CPU (s) | mergekit CPU (s) "
        "| ours peak RSS (GB) | mergekit peak RSS (GB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in selected:
        o = outcomes[c.name]
        a, b = o.runs["ours"], o.runs["mergekit"]
        wall = [_median(a, "wall_s"), _median(b, "wall_s")]
        cpu = [_median(a, "cpu_s"), _median(b, "cpu_s")]
        rss = [max((s.peak_rss for s in runs), default=0) / 1e9 for runs in (a, b)]
        ratio = f"**{wall[1] / wall[0]:.2f}×**" if a and b else "—"
        cells = [f"{x:.1f}" if x == x else "skipped" for x in wall]
        lines.append(
            f"| {c.name} | {c.params} | {cells[0]} | {cells[1]} | {ratio} | {cpu[0]:.1f} | {cpu[1]:.1f} | "
            f"{rss[0]:.2f} | {rss[1]:.2f} |".replace("nan", "—")
        )
    return lines


def agreement_table(selected: list[Case], outcomes: dict[str, Outcome]) -> list[str]:
    lines = [
        "| method | tensors | bitwise equal | ≤ 1 bf16 ulp apart | max abs diff | mean abs diff | where the max is |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in selected:
        o = outcomes[c.name]
        if o.check is None:
            why = "; ".join(f"{t}: {w}" for t, w in o.skipped.items()) or o.check_error or "not checked"
            lines.append(f"| {c.name} | — | — | — | — | — | {why} |")
            continue
        a = o.check["agreement"]
        layout = ""
        if o.check["missing_in_ours"] or o.check["missing_in_mergekit"] or o.check["mismatched"]:
            layout = (
                f" (DIFFERENT LAYOUT: {len(o.check['missing_in_ours'])} missing in ours, "
                f"{len(o.check['missing_in_mergekit'])} in mergekit's, {len(o.check['mismatched'])} mismatched)"
            )
        lines.append(
            f"| {c.name} | {o.check['tensors']}{layout} | {_pct(a['bitwise_equal_frac'])} | "
            f"{_pct(a['within_1ulp_frac'])} | {a['max_abs']:.3g} | {a['mean_abs']:.3g} | `{o.check['worst_tensor']}` |"
        )
    return lines


def exact_table(selected: list[Case], outcomes: dict[str, Outcome]) -> list[str]:
    lines = [
        "| method | tool | correctly rounded | exact ties in the reference | other side of a tie | 1 ulp off, "
        "not a tie | ≥ 2 ulps off, cancellation | ≥ 2 ulps off, other | max dist. from correctly rounded "
        "| mean abs error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in selected:
        ex = (outcomes[c.name].check or {}).get("exact")
        if not ex:
            continue
        for tool in TOOLS:
            e = ex[tool]
            lines.append(
                f"| {c.name} | {tool} | {_pct(e['correctly_rounded_frac'])} | {e['ties']} | {e['wrong_at_tie']} | "
                f"{e['wrong_1ulp']} | {e['cancellation']} | {e['wrong_more']} | {e['max_vs_rounded']:.3g} | "
                f"{e['mean_abs']:.3g} |"
            )
    return lines


def _fmt_list(xs: list[float | None], digits: int = 4) -> str:
    return "/".join("—" if x is None else f"{x:.{digits}f}" for x in xs)


def expected_row(case: Case) -> str | None:
    """What the definition predicts for the linear variants (no sign election): each model keeps a share
    dᵢ, by |δ| quartile flat (DARE) or (d − ε) + 2ε·(q + ½)/4 (DELLA); DARE's rescale ≈ 1/d."""
    if case.method not in ("dare_linear", "della_linear"):
        return None
    params = [m.get("parameters", {}) for m in case.recipe["models"]]
    d = [float(p.get("density", 1.0)) for p in params]
    eps = float(params[0].get("epsilon", 0.15))
    if case.method == "dare_linear":
        quart, scale = [d[0]] * 4, [1 / x for x in d]
    else:
        quart, scale = [(d[0] - eps) + 2 * eps * (q + 0.5) / 4 for q in range(4)], [None] * len(d)
    return f"| {case.name} | definition | — | — | {_fmt_list(d)} | {_fmt_list(quart, 3)} | {_fmt_list(scale)} | — | — |"


def random_table(selected: list[Case], outcomes: dict[str, Outcome]) -> list[str]:
    lines = [
        "| method | tool | out ≠ base | resolved | keep rate per model (resolved) | keep by \\|δ₁\\| row-rank "
        "quartile (model 1, low→high) | rescale factor (median) per model | out − base: mean / std | reproduced "
        "bit for bit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in selected:
        rnd = (outcomes[c.name].check or {}).get("random")
        if not rnd:
            continue
        expected = expected_row(c)
        if expected:
            lines.append(expected)
        for tool in TOOLS:
            r = rnd[tool]
            lines.append(
                f"| {c.name} | {tool} | {_pct(r['changed_frac'])} | {_pct(r['resolved_frac'])} | "
                f"{_fmt_list(r['keep'])} | {_fmt_list(r['keep_by_quartile'][0], 3)} | {_fmt_list(r['scale_median'])} | "
                f"{r['delta_mean']:.2e} / {r['delta_std']:.4e} | {_pct(r['fit_exact_frac'])} |"
            )
    return lines


def markdown(
    args: argparse.Namespace,
    info: dict[str, str],
    selected: list[Case],
    outcomes: dict[str, Outcome],
    started: str,
    loads: tuple[float, float],
    family_info: dict[str, Any],
    warm: tuple[int, float],
    elapsed: float,
) -> str:
    harness = max((s.harness_hwm for o in outcomes.values() for rs in o.runs.values() for s in rs), default=0)
    lines = [
        f"## {started} — method parity with mergekit, preset `{args.preset}`, N={args.repeats}",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- inputs: bench/parity_family.py `{args.preset}`: Llama {family_info['desc']}, "
        f"{family_info['params'] / 1e6:.1f}M params, base + 3 fine-tunes (δᵢ = 5% of the weights' std, pairwise "
        f"cosine 0.5), {family_info['bytes'] / 1e6:.0f} MB per model, bf16, 2 shards; page cache warmed "
        f"({warm[0] / 1e9:.2f} GB in {warm[1]:.1f} s)",
        f"- machine: {info['cpus']} CPUs ({info['cpu']}), {info['ram']} RAM; load average {loads[0]:.1f} at start, "
        f"{loads[1]:.1f} at end (shared); the whole run took {elapsed / 60:.1f} min",
        f"- {info['ours']}; {info['mergekit']}",
        f"- ours: `merge RECIPE OUT --overwrite --no-hash -q {args.ours_args}`; mergekit: "
        f"`mergekit-yaml RECIPE OUT --quiet {args.mk_args}`; same YAML file; rounds interleaved, the tool "
        f"that goes first alternating; medians of N; peak RSS = max over rounds (`wait4`; harness high-water "
        f"mark {harness / 1e9:.2f} GB)",
        "",
        "### Time and memory",
        "",
        *timing_table(selected, outcomes),
        "",
        "### Ours vs mergekit, every tensor (round 1's outputs)",
        "",
        *agreement_table(selected, outcomes),
        "",
    ]
    ex = exact_table(selected, outcomes)
    if len(ex) > 2:
        tensors = next(o.check["exact"]["tensors"] for o in outcomes.values() if o.check and o.check.get("exact"))
        lines += [
            "### Against the exact float64 reference (deterministic methods)",
            "",
            f"bench/parity_check.py computes each method's definition in float64 from the inputs on {len(tensors)} "
            f"tensors ({', '.join(f'`{t}`' for t in tensors)}; for the frankenmerge: the source tensors). "
            "For the linear family (linear, task_arithmetic, ties, breadcrumbs) the weights are the short "
            "fractions the recipe means (0.7 = 7/10, a gradient's value at layer i of n), scaled to integers, "
            "so that the weighted sums and the TIES sign vote are exact and only the final division rounds; "
            "the other references are plain float64 (~1e-16 relative). The reference is rounded to bf16 "
            "correctly (nearest, ties to even; torch's float64→bf16 conversion rounds twice, through float32). "
            "Columns: *exact ties*: elements whose exact value lies halfway between two bf16 values (weights "
            "like 0.5 make many); *other side of a tie*: 1 ulp off at such a tie, where any float32 rounding of "
            "a weight decides the side; *cancellation*: ≥ 2 ulps off but by less than 4 float32 ulps of the "
            "largest input (a result that is exactly 0 computed as ±1e-11); *other*: off by more than float32 "
            "arithmetic explains.",
            "",
            *ex,
            "",
        ]
    rnd = random_table(selected, outcomes)
    if len(rnd) > 2:
        lines += [
            "### Random methods (DARE, DELLA): statistics, not elements",
            "",
            "Each tool draws its own random masks, so outputs cannot agree element by element. Per 2-D tensor, "
            "parity_check decodes which task vectors each element kept: the subset S of models whose value "
            "λ·Σ_S sᵢwᵢδᵢ (÷ Σ_S wᵢ with TIES normalisation) reproduces the bf16 output (else: is nearest to "
            "out − base), with sᵢ the L1 rescale factor re-estimated from the large |δᵢ| that model i alone "
            "explains. Elements that several subsets reproduce (tiny δ, or δ₁ ≈ δ₂) are ambiguous and left "
            'out ("resolved" is the rest). With TIES sign election a kept entry that disagrees is '
            'indistinguishable from a dropped one, so there "keep" means kept and agreeing. Element-weighted '
            "over all 2-D tensors:",
            "",
            *rnd,
            "",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(parity_family.PRESETS), default="small")
    ap.add_argument("-n", "--repeats", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="family seed")
    ap.add_argument("--ours-args", default="", help="extra args for merge")
    ap.add_argument("--mk-args", default="", help="extra args for mergekit-yaml")
    ap.add_argument("--no-check", action="store_true", help="timings only")
    ap.add_argument(
        "--recheck", action="store_true", help="merge nothing: check the outputs kept by an earlier --keep-outputs run"
    )
    ap.add_argument("--no-snapshot", action="store_true", help="run the live repo code instead of a frozen copy")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the last round's outputs")
    ap.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--results", type=Path, default=RESULTS_MD)
    ap.add_argument("--merge-bin", type=Path, default=MERGE_BIN)
    ap.add_argument("--mergekit-bin", type=Path, default=MERGEKIT_BIN)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()[0]
    family = parity_family.family_dir(args.preset)
    if not parity_family.is_current(args.preset, args.seed):
        # A child process: generating here would raise this process's RSS high-water mark (see procstats).
        subprocess.run(
            [sys.executable, str(BENCH / "parity_family.py"), "--preset", args.preset, "--seed", str(args.seed)],
            check=True,
        )
    preset = parity_family.PRESETS[args.preset]
    import make_family

    specs = make_family.tensor_specs(preset)
    family_info = {
        "params": sum(s.numel for s in specs),
        "bytes": sum(s.nbytes for s in specs),
        "desc": f"hidden {preset.hidden}, {preset.layers} layers, vocab {preset.vocab}, "
        f"intermediate {preset.intermediate}, {preset.heads}/{preset.kv_heads} heads",
    }
    all_cases = cases(family, preset.layers)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in {c.name for c in all_cases}]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {[c.name for c in all_cases]}")
    selected = [c for c in all_cases if not wanted or c.name in wanted]

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = {
        "recipes": family / "recipes",
        "out": family / "out",
        "logs": WORK / "logs" / f"parity-{args.preset}-{stamp}",
        "checks": WORK / "results" / f"parity-{args.preset}-{stamp}",
    }
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    for c in selected:
        (paths["recipes"] / f"{slug(c.name)}.yaml").write_text(yaml.safe_dump(c.recipe, sort_keys=False))

    code_root, digest = (None, "live code") if args.no_snapshot else snapshot_code()
    env = child_env(code_root)
    where, _, _kernel = probe_code(env)
    print(f"mergekitlite imported from {where}")
    if code_root is not None and not Path(where).is_relative_to(code_root):
        raise SystemExit(f"the snapshot is not what the children import ({where}); use --no-snapshot")
    info = machine_info(args, f"code {digest}" if code_root is None else f"code snapshot {digest}")
    print(json.dumps(info, indent=2))
    warm = warm_cache([p for m in parity_family.MODELS for p in model_shards(family / m)])

    if args.recheck:
        outcomes = {c.name: Outcome() for c in selected}
        for c in selected:
            run_check(c, args, paths, outcomes[c.name])
        args.keep_outputs, args.no_write = True, True
    else:
        outcomes = run_rounds(selected, args, paths, env)
    loads = (load_start, os.getloadavg()[0])
    section = markdown(args, info, selected, outcomes, started, loads, family_info, warm, time.perf_counter() - t0)
    print("\n" + section)
    raw = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": info,
        "recipes": {c.name: c.recipe for c in selected},
        "runs": {n: {t: [s.as_dict() for s in rs] for t, rs in o.runs.items()} for n, o in outcomes.items()},
        "skipped": {n: o.skipped for n, o in outcomes.items()},
        "checks": {n: o.check for n, o in outcomes.items()},
    }
    (paths["checks"] / "raw.json").write_text(json.dumps(raw, indent=2) + "\n")
    if not args.no_write:
        with open(args.results, "a") as f:
            f.write("\n" + section)
        print(f"appended to {args.results}")
    if not args.keep_outputs:
        shutil.rmtree(paths["out"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
