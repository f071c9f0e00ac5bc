"""Benchmark ``merge`` against mergekit (and the I/O floor) on a generated Llama family.

One invocation runs every variant interleaved, round by round (ours, mergekit, floor, ours,
mergekit, floor, ...), and reports medians and spreads; each variant is a separate process measured
by bench/procstats.py (wall, CPU, ``wait4`` peak RSS, anonymous vs file-backed RSS). The recipe is
task_arithmetic, base + 1.0·(ft1 − base) + 1.0·(ft2 − base) in bf16, read by both tools.

    python bench/run_bench.py --preset 1.3b                      # N=3, ours + mergekit + floors
    python bench/run_bench.py --preset 2.6b -n 1 --ours-args "" --ours-args "-j 2"
    python bench/run_bench.py --preset tiny --no-write           # quick end-to-end check
    python bench/run_bench.py --preset 1.3b --tools ours,floor --code REV --code .   # two versions side by side

Between runs (untimed) the previous output is deleted and ``sync`` is called, so that one run's
dirty pages are not written back during the next one; how long that sync took is reported, since
mergekit does not fsync and leaves its writeback to after it exits. The methodology is described at
the top of bench/RESULTS.md, where results are appended; raw numbers go to bench/.work/results/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import harness
import make_family
from procstats import Job, RunStats, clear_output, evict, interleave, read_files, slug, summarize

WEIGHTS = (1.0, 1.0)
DEFAULT_EXACT = ",".join(
    [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "lm_head.weight",
    ]
)


def recipe_text(family: Path) -> str:
    """task_arithmetic: base + 1.0·(ft1 − base) + 1.0·(ft2 − base), bf16; read by both tools."""
    models = "".join(
        f"  - model: {family / m}\n    parameters: {{weight: {w}}}\n" for m, w in zip(("ft1", "ft2"), WEIGHTS)
    )
    return f"merge_method: task_arithmetic\nbase_model: {family / 'base'}\nmodels:\n{models}dtype: bfloat16\n"


def shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def build_variants(
    args: argparse.Namespace, family: Path, recipe: Path, codes: list[harness.Code]
) -> list[tuple[str, Job]]:
    """(tool, job) for every variant: "ours" (per code version: "ours A", "ours B" with two --code), "mergekit"
    or "floor"."""
    variants: list[tuple[str, Job]] = []
    tools = set(args.tools.split(","))
    code = codes[0]

    def add(tool: str, label: str, before: list[str], after: list[str], env: dict[str, str] = code.env) -> None:
        out = family / "out" / slug(label)
        variants.append((tool, Job(label, [*before, str(out), *after], env, out)))

    for version in codes:
        name = "ours" if len(codes) == 1 else f"ours {version.label}"
        for extra in args.ours_args if "ours" in tools else []:
            flags = ["--overwrite", "--no-hash", *shlex.split(extra)]
            add("ours", f"{name} {extra}".strip(), [str(args.merge_bin), str(recipe)], flags, version.env)
    for extra in args.mk_args if "mergekit" in tools else []:
        add("mergekit", f"mergekit {extra}".strip(), [str(args.mergekit_bin), str(recipe)], shlex.split(extra))
    if "floor" in tools:
        copy = [str(p) for p in shards(family / "base")]
        read = [str(p) for m in ("ft1", "ft2") for p in shards(family / m)]
        every = code.sync_every
        for label, sync in ((f"floor (fsync/{every / 2**20:.0f}MiB)", every), ("floor (no fsync)", 0)):
            floor = [sys.executable, str(harness.BENCH / "io_floor.py")]
            add("floor", label, floor, ["--copy", *copy, "--read", *read, "--sync-every", str(sync)])
    return variants


def describe(s: RunStats) -> str:
    anon = s.sampled.get("RssAnon", 0) / 1e9
    file_ = s.sampled.get("RssFile", 0) / 1e9
    return (
        f"{s.wall_s:7.1f} s wall, {s.cpu_s:7.1f} s CPU, peak RSS {s.peak_rss / 1e9:.2f} GB "
        f"(sampled anon {anon:.2f} + file {file_:.2f}), sync after {s.extra.get('post_sync_s', 0):.1f} s, "
        f"load {s.loadavg_before:.1f}"
    )


# ---------------------------------------------------------------- verification
def verify(variants: list[tuple[str, Job]], recipe: Path, exact: str) -> dict[str, object]:
    """Our output vs mergekit's (everywhere) and both vs the exact float64 result (``exact`` tensors)."""
    import compare  # deferred: imports torch, which the timing loop does not need
    import torch
    from reference import RecipeReference

    torch.set_num_threads(1)  # untimed, and the CPUs are shared: be gentle
    ours = [job for tool, job in variants if tool == "ours"]
    mks = [job for tool, job in variants if tool == "mergekit"]
    checks: dict[str, object] = {}
    names = "all" if exact == "all" else [] if exact == "none" else exact.split(",")
    if ours and mks:
        started = time.perf_counter()
        with compare.Reader() as reader:
            rep = compare.compare(ours[0].out, mks[0].out, RecipeReference(recipe, reader), names, reader)
        checks["ours_vs_mergekit"] = rep.as_dict()
        print(f"verification: {time.perf_counter() - started:.0f} s", flush=True)
    for first, others in ((ours[:1], ours[1:]), (mks[:1], mks[1:])):
        for other in others:
            checks[f"{first[0].label} vs {other.label}"] = compare.compare(first[0].out, other.out).as_dict()
    return checks


# ---------------------------------------------------------------- report
def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def markdown(
    args: argparse.Namespace,
    head: list[str],
    family: make_family.Family,
    summaries: dict[str, dict[str, float]],
    variants: list[tuple[str, Job]],
    checks: dict[str, object],
    warm: tuple[int, float],
) -> str:
    specs = family.specs()
    cache = (
        "**cold**: the inputs were evicted from the page cache before every run (read from the disk; "
        f"a plain sequential read of them took {warm[1]:.1f} s for {_gb(warm[0])} GB)"
        if args.cold
        else f"page cache warmed by reading {_gb(warm[0])} GB in {warm[1]:.1f} s"
    )
    lines = [
        *head,
        f"- inputs: {sum(s.numel for s in specs) / 1e9:.3f}B params, 3 × {_gb(sum(s.nbytes for s in specs))} GB "
        f"bf16; {cache}",
        f"- harness high-water RSS at spawn (Linux passes it on to each child's ru_maxrss, so a lower bound for "
        f"the peaks below): {_gb(max(s['harness_hwm'] for s in summaries.values()))} GB",
        "",
        "| run | wall median (s) | min–max (s) | CPU median (s) | peak RSS max (GB) | sampled anon / file "
        "peak (GB) | sync after (s) | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for _, job in variants:
        s = summaries[job.label]
        lines.append(
            f"| {job.label} | {s['wall_median']:.1f} | {s['wall_min']:.1f}–{s['wall_max']:.1f} | "
            f"{s['cpu_median']:.1f} | {_gb(s['peak_rss_max'])} | {_gb(s['anon_peak_max'])} / "
            f"{_gb(s['file_peak_max'])} | {s['post_sync_median']:.1f} | {s['load_median']:.1f} |"
        )
    lines += ["", *ratio_lines(variants, summaries), *check_lines(checks)]
    return "\n".join(lines) + "\n"


def ratio_lines(variants: list[tuple[str, Job]], summaries: dict[str, dict[str, float]]) -> list[str]:
    ours = [job for tool, job in variants if tool == "ours"]
    out = []
    for b in ours[1:]:
        a, v = summaries[ours[0].label], summaries[b.label]
        out.append(
            f"- {b.label} / {ours[0].label}: **{v['wall_median'] / a['wall_median']:.3f}×** wall (medians), "
            f"{v['cpu_median'] / a['cpu_median']:.3f}× CPU time"
        )
    for o in (job for tool, job in variants if tool == "ours"):
        for tool, v in variants:
            if tool == "ours":
                continue
            r = summaries[v.label]["wall_median"] / summaries[o.label]["wall_median"]
            c = summaries[v.label]["cpu_median"] / summaries[o.label]["cpu_median"]
            if tool == "mergekit":
                out.append(f"- {v.label} / {o.label}: **{r:.2f}×** wall (medians), {c:.2f}× CPU time")
            else:
                out.append(f"- {o.label} / {v.label}: **{1 / r:.2f}×** wall (medians), {1 / c:.2f}× CPU time")
    return [*out, ""] if out else []


def check_lines(checks: dict[str, object]) -> list[str]:
    lines: list[str] = []
    main_check = checks.get("ours_vs_mergekit")
    if isinstance(main_check, dict):
        a = main_check["agreement"]
        same = not (main_check["missing_in_a"] or main_check["missing_in_b"] or main_check["mismatched"])
        lines += [
            "Correctness (last round's outputs, every tensor, read block by block):",
            "",
            f"- ours vs mergekit: {a['bitwise_equal_frac'] * 100:.3f}% of {a['elements'] / 1e9:.3f}B elements "
            f"bitwise equal, {a['within_1ulp_frac'] * 100:.4f}% within one bf16 ulp (adjacent values), max abs diff "
            f"{a['max_abs']:.3g}, mean abs diff {a['mean_abs']:.3g}; tensor names/shapes/dtypes: "
            f"{'identical' if same else 'DIFFER'}",
        ]
        ea, eb, names = main_check["exact_a"], main_check["exact_b"], main_check["exact_tensors"]
        if ea["elements"]:
            lines += [
                f"- vs the exact float64 result on {len(names)} tensors ({ea['elements'] / 1e6:.1f}M elements: "
                f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}):",
                "",
                "| output | correctly rounded | max abs error | mean abs error | RMS error | max distance from "
                "the correctly rounded value |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for label, e in (("ours (float32 compute, one cast)", ea), ("mergekit (bf16 compute)", eb)):
                lines.append(
                    f"| {label} | {e['correctly_rounded_frac'] * 100:.3f}% | {e['max_abs']:.3g} | {e['mean_abs']:.3g} "
                    f"| {e['rms']:.3g} | {e['max_vs_rounded']:.3g} |"
                )
    others = [(name, rep) for name, rep in checks.items() if name != "ours_vs_mergekit" and isinstance(rep, dict)]
    if others:
        lines.append("")  # end the table above
    for name, rep in others:
        lines.append(f"- {name}: {rep['agreement']['bitwise_equal_frac'] * 100:.3f}% bitwise equal")
    return [*lines, ""] if lines else []


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(make_family.PRESETS), default="tiny")
    harness.add_flags(ap, repeats=3)
    ap.add_argument("--tools", default="ours,mergekit,floor", help="comma-separated subset of ours,mergekit,floor")
    ap.add_argument("--exact", default=DEFAULT_EXACT, help="tensors checked against float64: 'all', 'none' or names")
    ap.add_argument(
        "--cold", action="store_true", help="evict the inputs from the page cache before every run (reads hit the disk)"
    )
    args = ap.parse_args(argv)
    args.ours_args = args.ours_args or [""]
    args.mk_args = args.mk_args or [""]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = harness.Session(args.preset)
    family_root, family = make_family.ensure_in_child(args.preset, args.seed)
    recipe = family_root / "task_arithmetic.yaml"
    recipe.write_text(recipe_text(family_root))
    codes = harness.codes_under_test(args, most=2)
    variants = build_variants(args, family_root, recipe, codes)
    info = harness.machine_info(codes, args.mergekit_bin)
    print(json.dumps(info, indent=2))

    inputs = [p for m in family.models for p in shards(family_root / m)]
    if args.cold:
        evict(inputs)  # then read_files times a plain sequential read from the disk
    warm = read_files(inputs)
    print(f"page cache warmed: {warm[0] / 1e9:.2f} GB in {warm[1]:.1f} s", flush=True)

    def show(r: int, s: RunStats) -> None:
        print(f"round {r}/{args.repeats} {s.label:28s} {describe(s)}", flush=True)

    jobs = [job for _, job in variants]
    rounds = interleave([jobs], args.repeats, session.logs, cold=inputs if args.cold else (), on_run=show)
    for job in jobs:  # the floor reports its read and copy times as its last line
        for s in rounds.runs[job.label] if job.label.startswith("floor") else ():
            s.extra.update({k: float(x) for k, x in json.loads(Path(s.log).read_text().splitlines()[-1]).items()})
    summaries = {label: summarize(r) for label, r in rounds.runs.items()}
    checks = {} if args.no_check else verify(variants, recipe, args.exact)
    head = session.head(f"preset `{args.preset}`, N={args.repeats}", info)
    section = markdown(args, head, family, summaries, variants, checks, warm)
    session.finish(args, section, info, rounds.runs, summaries=summaries, checks=checks)
    if not args.keep_outputs:
        for job in jobs:
            clear_output(job.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
