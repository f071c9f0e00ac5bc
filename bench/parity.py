"""Method-by-method parity with mergekit: the same YAML through both tools, timed side by side and compared.

For every merge method (mergekit's config names, typical published parameters) a recipe over a generated
bf16 Llama family (bench/make_family.py `parity-small`: base + three correlated fine-tunes) is merged by
``merge`` and by ``mergekit-yaml``, N rounds interleaved (round r: method by method, the tool that goes
first alternates), each run a separate process measured by bench/procstats.py (wall, CPU, ``wait4`` peak
RSS). In round 1 both outputs are compared by bench/parity_check.py (a child process, untimed): agreement
over every tensor, error against an exact float64 reference on a few tensors (deterministic methods),
decoded keep rates and rescale factors (DARE/DELLA, whose random draws cannot match).

    python bench/parity.py                          # preset small, N=2, appends to bench/RESULTS.md
    python bench/parity.py -n 1 --only ties,slerp --no-write
    python bench/parity.py --preset medium -n 2
    python bench/parity.py --preset 1.3b -n 3 --no-check   # real scale: the 1.3b family (two fine-tunes)
    python bench/parity.py --preset 1.3b -n 3 --tools ours --only della,sce   # our times alone

Ours runs from a frozen copy of mergekitlite/ (bench/harness.py), since others commit while it runs.
A method mergekit lacks or fails on is reported as skipped, with the reason from its log.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import string
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
import make_family
import yaml
from procstats import Job, Rounds, RunStats, clear_output, interleave, read_files, slug, summarize

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


def _with_paths(node: Any, family: Path) -> Any:
    """The recipe with the family's model names (base, ft1, ...) replaced by their folders."""
    if isinstance(node, list):
        return [_with_paths(x, family) for x in node]
    if isinstance(node, dict):
        return {k: str(family / v) if k in ("model", "base_model") else _with_paths(v, family) for k, v in node.items()}
    return node


def _family_dir(preset: str) -> str:
    """make_family's preset for ``--preset``: the parity families, or a plain one (1.3b) as is."""
    return preset if preset in make_family.PRESETS else f"parity-{preset}"


def _available(recipe: dict[str, Any], models: Sequence[str]) -> tuple[dict[str, Any], int]:
    """The recipe without its ``models:`` entries that the family lacks (ft3 in a two-fine-tune family), and how
    many were dropped."""
    entries = recipe.get("models")
    if not isinstance(entries, list):
        return recipe, 0
    kept = [e for e in entries if e.get("model") in models]
    return recipe | {"models": kept}, len(entries) - len(kept)


def cases(family: Path, layers: int, models: Sequence[str] = ("base", "ft1", "ft2", "ft3")) -> list[Case]:
    """bench/parity_cases.yaml: one recipe per method, over ``family``'s models (entries of models the family
    lacks are left out, and the params column says so; a case left with no model is dropped)."""
    cut = layers - 2
    values = {
        "layers": layers,
        "cut": cut,
        "lo": layers - cut,
        "cut_last": cut - 1,
        "last": layers - 1,
        "cut2": 2 * cut,
    }
    text = string.Template((harness.BENCH / "parity_cases.yaml").read_text()).substitute(values)
    out = []
    for c in yaml.safe_load(text):
        recipe, dropped = _available(c["recipe"], models)
        if recipe.get("models") == [] or any(s.get("sources") for s in recipe.get("slices", []) if "ft3" in str(s)):
            continue
        params = c["params"] + (f" ({dropped} model(s) the family lacks left out)" if dropped else "")
        out.append(Case(c["name"], _with_paths(recipe, family) | {"dtype": "bfloat16"}, params))
    return out


# ------------------------------------------------------------------ running
@dataclass
class Outcome:
    runs: dict[str, list[RunStats]] = field(default_factory=lambda: {t: [] for t in TOOLS})
    skipped: dict[str, str] = field(default_factory=dict)  # tool -> why
    check: dict[str, Any] | None = None  # bench/parity_check.py's report: compare.Report, a = ours, b = mergekit
    check_error: str = ""


@dataclass(frozen=True)
class Paths:
    recipes: Path
    out: Path
    checks: Path

    def recipe(self, case: Case) -> Path:
        return self.recipes / f"{slug(case.name)}.yaml"

    def output(self, case: Case, tool: str) -> Path:
        return self.out / f"{slug(case.name)}-{tool}"


def one(values: list[str] | None, flag: str) -> str:
    if values and len(values) > 1:
        raise SystemExit(f"parity.py takes one {flag}")
    return values[0] if values else ""


def jobs(case: Case, args: argparse.Namespace, paths: Paths, env: dict[str, str]) -> list[Job]:
    recipe = str(paths.recipe(case))
    ours = [str(args.merge_bin), recipe, str(paths.output(case, "ours")), "--overwrite", "--no-hash", "-q"]
    mk = [str(args.mergekit_bin), recipe, str(paths.output(case, "mergekit")), "--quiet"]
    cmds = {"ours": [*ours, *shlex.split(args.ours_args)], "mergekit": [*mk, *shlex.split(args.mk_args)]}
    return [Job(f"{case.name} {tool}", cmds[tool], env, paths.output(case, tool)) for tool in args.tools]


def exact_tensors(args: argparse.Namespace) -> list[str]:
    """Tensors checked against the float64 reference: attention and MLP matrices at different depths (different
    gradient values), a norm vector, the largest matrix."""
    n = make_family.PRESETS[_family_dir(args.preset)].sizes.layers
    return [
        "model.layers.1.self_attn.q_proj.weight",
        f"model.layers.{n - 2}.mlp.down_proj.weight",
        f"model.layers.{n - 1}.self_attn.k_proj.weight",
        f"model.layers.{n // 2}.post_attention_layernorm.weight",
        "lm_head.weight",
    ]


def run_check(case: Case, args: argparse.Namespace, paths: Paths, outcome: Outcome) -> None:
    report = paths.checks / f"{slug(case.name)}.json"
    cmd = [
        sys.executable,
        str(harness.BENCH / "parity_check.py"),
        str(paths.recipe(case)),
        "--ours",
        str(paths.output(case, "ours")),
        "--mergekit",
        str(paths.output(case, "mergekit")),
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


def run_rounds(
    selected: list[Case], args: argparse.Namespace, paths: Paths, env: dict[str, str], logs: Path
) -> dict[str, Outcome]:
    outcomes = {c.name: Outcome() for c in selected}
    groups = {c.name: jobs(c, args, paths, env) for c in selected}
    case_of = {job.label: c for c in selected for job in groups[c.name]}

    def show(r: int, s: RunStats) -> None:
        case, tool = s.label.rsplit(" ", 1)
        timing = (
            f"{s.wall_s:6.1f} s wall {s.cpu_s:6.1f} s CPU {s.peak_rss / 1e9:5.2f} GB load {s.loadavg_before:.1f}"
            if s.returncode == 0
            else f"FAILED exit {s.returncode}; see {s.log}"
        )
        print(f"round {r} {case:40s} {tool:8s} {timing}", flush=True)

    def after(r: int, group: Sequence[Job], rounds: Rounds) -> None:
        case = case_of[group[0].label]
        if r == 1 and not args.no_check and not any(job.label in rounds.skipped for job in group):
            run_check(case, args, paths, outcomes[case.name])
        if not (args.keep_outputs and r == args.repeats):
            for job in group:
                clear_output(job.out)

    rounds = interleave(
        list(groups.values()), args.repeats, logs, alternate=True, skip_failed=True, on_run=show, after_group=after
    )
    for c in selected:
        for tool, job in zip(args.tools, groups[c.name], strict=True):
            outcomes[c.name].runs[tool] = rounds.runs[job.label]
            if job.label in rounds.skipped:
                outcomes[c.name].skipped[tool] = rounds.skipped[job.label]
    return outcomes


# ------------------------------------------------------------------ report
def _pct(x: float) -> str:
    return f"{x * 100:.3f}%" if x < 0.99995 or x == 1 else f"{x * 100:.4f}%"


def timing_table(selected: list[Case], outcomes: dict[str, Outcome]) -> list[str]:
    """Medians per tool; *ours / TA*: our wall time over our task_arithmetic case's, same invocation (the goal of
    issue 13: every method within 1.5× of task arithmetic)."""
    lines = [
        "| method | recipe | ours wall (s) | mergekit wall (s) | mergekit / ours | ours / TA | ours CPU user+sys (s) "
        "| mergekit CPU (s) | ours peak RSS (GB) | mergekit peak RSS (GB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ta = outcomes["task_arithmetic"].runs["ours"] if "task_arithmetic" in outcomes else []
    ta_wall = summarize(ta)["wall_median"] if ta else float("nan")
    for c in selected:
        runs = [outcomes[c.name].runs[tool] for tool in TOOLS]
        a, b = (summarize(r) for r in runs)  # NaN where a tool was skipped
        wall, cpu = [a["wall_median"], b["wall_median"]], [a["cpu_median"], b["cpu_median"]]
        rss = [s["peak_rss_max"] / 1e9 if r else float("nan") for s, r in zip((a, b), runs, strict=True)]
        ratio = f"**{wall[1] / wall[0]:.2f}×**" if all(runs) else "—"
        cells = [f"{x:.1f}" if x == x else "skipped" for x in wall]
        split = f"{a['user_median']:.1f}+{a['sys_median']:.1f}" if runs[0] else "—"
        lines.append(
            f"| {c.name} | {c.params} | {cells[0]} | {cells[1]} | {ratio} | {wall[0] / ta_wall:.2f}× | {split} | "
            f"{cpu[1]:.1f} | "
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
        if o.check["missing_in_a"] or o.check["missing_in_b"] or o.check["mismatched"]:
            layout = (
                f" (DIFFERENT LAYOUT: {len(o.check['missing_in_a'])} missing in ours, "
                f"{len(o.check['missing_in_b'])} in mergekit's, {len(o.check['mismatched'])} mismatched)"
            )
        lines.append(
            f"| {c.name} | {o.check['tensors']}{layout} | {_pct(a['bitwise_equal_frac'])} | "
            f"{_pct(a['within_1ulp_frac'])} | {a['max_abs']:.3g} | {a['mean_abs']:.3g} | `{o.check['worst_tensor']}` |"
        )
    return lines


def per_tool(outcome: Outcome, part: str) -> dict[str, dict[str, Any]] | None:
    """A check's "exact" or "random" part, by tool (None where the method has none)."""
    check = outcome.check or {}
    if part == "exact":
        return {"ours": check["exact_a"], "mergekit": check["exact_b"]} if check.get("exact_tensors") else None
    return check.get(part)


def tool_table(
    header: list[str],
    selected: list[Case],
    outcomes: dict[str, Outcome],
    part: str,
    row: Callable[[dict[str, Any]], str],
    first: Callable[[Case], str | None] = lambda case: None,
) -> list[str]:
    """One row per (method, tool) that has ``part``; ``first(case)`` may add a row above a method's."""
    lines = list(header)
    for c in selected:
        data = per_tool(outcomes[c.name], part)
        if data:
            lines += [extra for extra in [first(c)] if extra]
            lines += [f"| {c.name} | {tool} | {row(data[tool])} |" for tool in TOOLS]
    return lines


EXACT_HEADER = [
    "| method | tool | correctly rounded | exact ties in the reference | other side of a tie | 1 ulp off, not a tie "
    "| ≥ 2 ulps off, cancellation | ≥ 2 ulps off, other | max dist. from correctly rounded | mean abs error |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
]
RANDOM_HEADER = [
    "| method | tool | out ≠ base | resolved | keep rate per model (resolved) | keep by \\|δ₁\\| row-rank "
    "quartile (model 1, low→high) | rescale factor (median) per model | out − base: mean / std | reproduced "
    "bit for bit |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|",
]


def exact_row(e: dict[str, Any]) -> str:
    return (
        f"{_pct(e['correctly_rounded_frac'])} | {e['ties']} | {e['wrong_at_tie']} | {e['wrong_1ulp']} | "
        f"{e['cancellation']} | {e['wrong_more']} | {e['max_vs_rounded']:.3g} | {e['mean_abs']:.3g}"
    )


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


def random_row(r: dict[str, Any]) -> str:
    return (
        f"{_pct(r['changed_frac'])} | {_pct(r['resolved_frac'])} | {_fmt_list(r['keep'])} | "
        f"{_fmt_list(r['keep_by_quartile'][0], 3)} | {_fmt_list(r['scale_median'])} | "
        f"{r['delta_mean']:.2e} / {r['delta_std']:.4e} | {_pct(r['fit_exact_frac'])}"
    )


def markdown(
    args: argparse.Namespace,
    head: list[str],
    selected: list[Case],
    outcomes: dict[str, Outcome],
    family: make_family.Family,
    warm: tuple[int, float],
) -> str:
    hwm = max((s.harness_hwm for o in outcomes.values() for rs in o.runs.values() for s in rs), default=0)
    p, specs = family.sizes, family.specs()
    lines = [
        *head,
        f"- inputs: bench/make_family.py `parity-{args.preset}`: Llama hidden {p.hidden}, {p.layers} layers, vocab "
        f"{p.vocab}, intermediate {p.intermediate}, {p.heads}/{p.kv_heads} heads, "
        f"{sum(s.numel for s in specs) / 1e6:.1f}M params, base + {family.fine_tunes} fine-tunes (δᵢ = "
        f"{family.noise:.0%} of the weights' std, pairwise cosine {family.rho}), "
        f"{sum(s.nbytes for s in specs) / 1e6:.0f} MB per model, {family.dtype}, "
        f"{len(make_family.split_shards(specs, p.shard_bytes))} shards; page cache warmed "
        f"({warm[0] / 1e9:.2f} GB in {warm[1]:.1f} s)",
        f"- ours: `merge RECIPE OUT --overwrite --no-hash -q {args.ours_args}`; mergekit: "
        f"`mergekit-yaml RECIPE OUT --quiet {args.mk_args}`; same YAML file; rounds interleaved, the tool "
        f"that goes first alternating; medians of N; peak RSS = max over rounds (`wait4`; harness high-water "
        f"mark {hwm / 1e9:.2f} GB)",
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
    ex = tool_table(EXACT_HEADER, selected, outcomes, "exact", exact_row)
    if len(ex) > 2:
        tensors = next(o.check["exact_tensors"] for o in outcomes.values() if per_tool(o, "exact"))
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
    rnd = tool_table(RANDOM_HEADER, selected, outcomes, "random", random_row, expected_row)
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
    ap.add_argument(
        "--preset", choices=["small", "medium", "1.3b"], default="small", help="make_family's parity-PRESET, or 1.3b"
    )
    harness.add_flags(ap, repeats=2)
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    ap.add_argument(
        "--recheck", action="store_true", help="merge nothing: check the outputs kept by an earlier --keep-outputs run"
    )
    ap.add_argument("--tools", default="ours,mergekit", help="ours,mergekit (default) or ours: our times alone")
    args = ap.parse_args(argv)
    args.ours_args, args.mk_args = one(args.ours_args, "--ours-args"), one(args.mk_args, "--mk-args")
    args.tools = tuple(t for t in TOOLS if t in args.tools.split(","))
    if "mergekit" not in args.tools:
        args.no_check = True  # nothing to compare ours with
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = harness.Session(f"parity-{args.preset}")
    family_root, family = make_family.ensure_in_child(_family_dir(args.preset), args.seed)
    all_cases = cases(family_root, family.sizes.layers, family.models)
    wanted = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in {c.name for c in all_cases}]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {[c.name for c in all_cases]}")
    selected = [c for c in all_cases if not wanted or c.name in wanted]

    paths = Paths(family_root / "recipes", family_root / "out", harness.WORK / "results" / session.name)
    for folder in (paths.recipes, paths.out, paths.checks):
        folder.mkdir(parents=True, exist_ok=True)
    for c in selected:
        paths.recipe(c).write_text(yaml.safe_dump(c.recipe, sort_keys=False))

    (code,) = harness.codes_under_test(args)
    info = harness.machine_info([code], args.mergekit_bin)
    print(json.dumps(info, indent=2))
    warm = read_files([p for m in family.models for p in sorted((family_root / m).glob("*.safetensors"))])

    if args.recheck:
        outcomes = {c.name: Outcome() for c in selected}
        for c in selected:
            run_check(c, args, paths, outcomes[c.name])
        args.keep_outputs, args.no_write = True, True
    else:
        outcomes = run_rounds(selected, args, paths, code.env, session.logs)
    head = session.head(f"method parity with mergekit, preset `{args.preset}`, N={args.repeats}", info)
    section = markdown(args, head, selected, outcomes, family, warm)
    runs = {f"{n} {t}": rs for n, o in outcomes.items() for t, rs in o.runs.items()}
    recipes = {c.name: c.recipe for c in selected}
    skipped, checks = ({n: getattr(o, key) for n, o in outcomes.items()} for key in ("skipped", "check"))
    session.finish(args, section, info, runs, recipes=recipes, skipped=skipped, checks=checks)
    if not args.keep_outputs:
        shutil.rmtree(paths.out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
