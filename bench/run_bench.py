"""Benchmark ``merge`` against mergekit (and the I/O floor) on a generated Llama family.

One invocation runs every variant interleaved, round by round (ours, mergekit, floor, ours,
mergekit, floor, ...), so that load from other users of the machine spreads over all of them, and
reports medians and spreads. Each variant is a separate process measured with ``os.wait4``
(exact whole-process peak RSS, CPU time) plus a /proc sampler (anonymous vs file-backed RSS).

    python bench/run_bench.py --preset 1.3b                      # N=3, ours + mergekit + floors
    python bench/run_bench.py --preset 2.6b -n 1 --ours-args "" --ours-args "-j 2"
    python bench/run_bench.py --preset tiny --no-write           # quick end-to-end check

Between runs (untimed) the previous output is deleted and ``sync`` is called, so that one run's
dirty pages are not written back during the next one; how long that sync took is reported, since
mergekit does not fsync and leaves its writeback to after it exits. Results are appended to
bench/RESULTS.md; raw numbers go to bench/.work/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import make_family
from procstats import RunStats, run_measured

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / ".work"
RESULTS_MD = BENCH / "RESULTS.md"
MERGE_BIN = REPO / ".venv" / "bin" / "merge"
MERGEKIT_BIN = Path("/work/mkvenv/bin/mergekit-yaml")
SYNC_EVERY_FALLBACK = 512 * 1024 * 1024  # if ExecContext.sync_every_bytes cannot be read from the code under test
WEIGHTS = (1.0, 1.0)
DEFAULT_EXACT = ",".join(
    [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "lm_head.weight",
    ]
)


@dataclass(frozen=True)
class Variant:
    label: str
    tool: str  # "ours", "mergekit" or "floor"
    cmd: list[str]
    out: Path


# ---------------------------------------------------------------- setup
def snapshot_code() -> tuple[Path, str]:
    """Copy mergekitlite/ to .work/snapshots/<digest>/ and return (that root, digest).

    Others commit to the repo while a benchmark runs (a 20-minute run once straddled an executor
    rewrite); running every round from one frozen copy keeps the rounds comparable, and the
    digest says exactly which code was measured.
    """
    src = REPO / "mergekitlite"
    files = sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    digest = h.hexdigest()[:12]
    root = WORK / "snapshots" / digest
    if not (root / "mergekitlite").exists():
        tmp = root.with_name(digest + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp / "mergekitlite", ignore=shutil.ignore_patterns("__pycache__"))
        tmp.rename(root)
    return root, digest


def probe_code(env: dict[str, str]) -> tuple[str, int, str]:
    """Where the children import mergekitlite from, its executor's fsync interval, and whether its
    native kernel is built ("yes", "no", or "n/a" for code from before the kernel)."""
    code = (
        "import mergekitlite, mergekitlite.execute as e; "
        "print(mergekitlite.__file__); print(getattr(e.ExecContext(), 'sync_every_bytes', 0))\n"
        "try:\n from mergekitlite.methods import native; print('yes' if native.available() else 'no')\n"
        "except ImportError:\n print('n/a')"
    )
    # -P: like the `merge` script, do not put the cwd (the repo, with its live package) first on sys.path.
    out = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, check=True)
    where, every, kernel = out.stdout.split()
    return where, int(every) or SYNC_EVERY_FALLBACK, kernel


def recipe_text(family: Path) -> str:
    """task_arithmetic: base + 1.0·(ft1 − base) + 1.0·(ft2 − base), bf16; read by both tools."""
    return (
        "merge_method: task_arithmetic\n"
        f"base_model: {family / 'base'}\n"
        "models:\n"
        f"  - model: {family / 'ft1'}\n"
        f"    parameters: {{weight: {WEIGHTS[0]}}}\n"
        f"  - model: {family / 'ft2'}\n"
        f"    parameters: {{weight: {WEIGHTS[1]}}}\n"
        "dtype: bfloat16\n"
    )


def shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def warm_cache(files: list[Path]) -> tuple[int, float]:
    """Read every input once, so the first timed run does not pay for the disk."""
    buf = bytearray(16 * 1024 * 1024)
    total = 0
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total, time.perf_counter() - started


def _label(base: str, extra: str) -> str:
    return f"{base} {extra}".strip()


def build_variants(args: argparse.Namespace, family: Path, recipe: Path, sync_every: int) -> list[Variant]:
    out_root = family / "out"
    variants: list[Variant] = []
    tools = set(args.tools.split(","))

    def out_dir(label: str) -> Path:
        return out_root / "".join(c if c.isalnum() or c in "-_." else "_" for c in label)

    if "ours" in tools:
        for extra in args.ours_args:
            label = _label("ours", extra)
            cmd = [
                str(args.merge_bin),
                str(recipe),
                str(out_dir(label)),
                "--overwrite",
                "--no-hash",
                *shlex.split(extra),
            ]
            variants.append(Variant(label, "ours", cmd, out_dir(label)))
    if "mergekit" in tools:
        for extra in args.mk_args:
            label = _label("mergekit", extra)
            cmd = [str(args.mergekit_bin), str(recipe), str(out_dir(label)), *shlex.split(extra)]
            variants.append(Variant(label, "mergekit", cmd, out_dir(label)))
    if "floor" in tools:
        copy = [str(p) for p in shards(family / "base")]
        read = [str(p) for m in ("ft1", "ft2") for p in shards(family / m)]
        for label, every in ((f"floor (fsync/{sync_every / 2**20:.0f}MiB)", sync_every), ("floor (no fsync)", 0)):
            cmd = [
                sys.executable,
                str(BENCH / "io_floor.py"),
                str(out_dir(label)),
                "--copy",
                *copy,
                "--read",
                *read,
                "--sync-every",
                str(every),
            ]
            variants.append(Variant(label, "floor", cmd, out_dir(label)))
    return variants


def clear_output(out: Path) -> None:
    for path in (out, out.with_name(out.name + ".partial")):
        if path.exists():
            shutil.rmtree(path)


def child_env(code_root: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    # Local paths only: never let a tool wait on the network (there is none here).
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    if code_root is not None:
        # Ahead of the editable install's finder (which sits after the path finder in sys.meta_path).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code_root), env.get("PYTHONPATH")]))
    return env


# ---------------------------------------------------------------- running
def evict(files: list[Path]) -> None:
    """Drop the inputs from the page cache (POSIX_FADV_DONTNEED on clean pages needs no root), so the
    next run reads them from the disk, as a first merge of freshly downloaded models does."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_variant(v: Variant, round_no: int, logs: Path, env: dict[str, str], cold: list[Path] | None = None) -> RunStats:
    clear_output(v.out)
    os.sync()  # flush the previous run's writeback before the clock starts
    if cold:
        evict(cold)
    stats = run_measured(v.label, v.cmd, logs / f"{v.out.name}-{round_no}.log", env=env)
    started = time.perf_counter()
    os.sync()  # what the tool left to write back (mergekit never fsyncs)
    stats.extra["post_sync_s"] = time.perf_counter() - started
    if v.tool == "floor" and stats.returncode == 0:
        last = (logs / f"{v.out.name}-{round_no}.log").read_text().strip().splitlines()[-1]
        stats.extra.update({k: float(x) for k, x in json.loads(last).items()})
    return stats


def describe(s: RunStats) -> str:
    anon = s.sampled.get("RssAnon", 0) / 1e9
    file_ = s.sampled.get("RssFile", 0) / 1e9
    return (
        f"{s.wall_s:7.1f} s wall, {s.cpu_s:7.1f} s CPU, peak RSS {s.peak_rss / 1e9:.2f} GB "
        f"(sampled anon {anon:.2f} + file {file_:.2f}), sync after {s.extra.get('post_sync_s', 0):.1f} s, "
        f"load {s.loadavg_before:.1f}"
    )


def run_rounds(
    variants: list[Variant], repeats: int, logs: Path, env: dict[str, str], cold: list[Path] | None = None
) -> dict[str, list[RunStats]]:
    results: dict[str, list[RunStats]] = {v.label: [] for v in variants}
    for r in range(1, repeats + 1):
        for v in variants:
            s = run_variant(v, r, logs, env, cold)
            results[v.label].append(s)
            print(f"round {r}/{repeats} {v.label:28s} {describe(s)}", flush=True)
            if s.returncode != 0:
                raise SystemExit(f"{v.label} failed (exit {s.returncode}); see {logs / f'{v.out.name}-{r}.log'}")
    return results


# ---------------------------------------------------------------- summary
def summarize(runs: list[RunStats]) -> dict[str, float]:
    walls = [s.wall_s for s in runs]
    return {
        "n": len(runs),
        "wall_median": statistics.median(walls),
        "wall_min": min(walls),
        "wall_max": max(walls),
        "cpu_median": statistics.median(s.cpu_s for s in runs),
        "peak_rss_max": max(s.peak_rss for s in runs),
        "peak_rss_median": statistics.median(s.peak_rss for s in runs),
        "anon_peak_max": max(s.sampled.get("RssAnon", 0) for s in runs),
        "file_peak_max": max(s.sampled.get("RssFile", 0) for s in runs),
        "post_sync_median": statistics.median(s.extra.get("post_sync_s", 0.0) for s in runs),
        "load_median": statistics.median(s.loadavg_before for s in runs),
        "harness_hwm": max(s.harness_hwm for s in runs),
        "vmhwm_sampled_max": max(s.sampled.get("VmHWM", 0) for s in runs),
    }


def _version_in(python: Path, *packages: str) -> dict[str, str]:
    code = "import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    try:
        out = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)
    except (OSError, subprocess.CalledProcessError, json.JSONDecodeError):
        return dict.fromkeys(packages, "?")


def machine_info(args: argparse.Namespace, code: str) -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    ours = _version_in(Path(sys.executable), "mergekitlite", "torch", "safetensors")
    mk = _version_in(Path(args.mergekit_bin).parent / "python", "mergekit", "torch", "transformers")
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "mergekitlite"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += " (+ uncommitted changes in mergekitlite/)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return {
        "cpus": str(os.cpu_count()),
        "ram": f"{mem_kb / 1024**2:.1f} GiB",
        "cpu": cpu,
        "python": platform.python_version(),
        "ours": f"mergekitlite {ours['mergekitlite']} @ {commit} ({code}), torch {ours['torch']}, "
        f"safetensors {ours['safetensors']}",
        "mergekit": f"mergekit {mk['mergekit']}, torch {mk['torch']}, transformers {mk['transformers']}",
    }


# ---------------------------------------------------------------- verification
def verify(variants: list[Variant], family: Path, exact: str) -> dict[str, object]:
    """Our output vs mergekit's (everywhere) and both vs the exact float64 result (``exact`` tensors)."""
    import compare  # deferred: imports torch, which the timing loop does not need
    import torch

    torch.set_num_threads(1)  # untimed, and the CPUs are shared: be gentle

    ours = [v for v in variants if v.tool == "ours"]
    mks = [v for v in variants if v.tool == "mergekit"]
    checks: dict[str, object] = {}
    if ours and mks:
        started = time.perf_counter()
        rep = compare.compare(ours[0].out, mks[0].out, family, WEIGHTS, exact)
        checks["ours_vs_mergekit"] = rep.as_dict()
        print(f"verification: {time.perf_counter() - started:.0f} s", flush=True)
    for other in ours[1:] + mks[1:]:
        first = ours[0] if other.tool == "ours" else mks[0]
        rep = compare.compare(first.out, other.out, None, WEIGHTS, "none")
        checks[f"{first.label} vs {other.label}"] = rep.as_dict()
    return checks


# ---------------------------------------------------------------- report
def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def markdown(
    args: argparse.Namespace,
    info: dict[str, str],
    family_info: dict[str, object],
    summaries: dict[str, dict[str, float]],
    variants: list[Variant],
    checks: dict[str, object],
    warm: tuple[int, float],
    started: str,
    loads: tuple[float, float],
) -> str:
    cache = (
        "**cold**: the inputs were evicted from the page cache before every run (read from the disk; "
        f"a plain sequential read of them took {warm[1]:.1f} s for {_gb(warm[0])} GB)"
        if args.cold
        else f"page cache warmed by reading {_gb(warm[0])} GB in {warm[1]:.1f} s"
    )
    lines = [
        f"## {started} — preset `{args.preset}`, N={args.repeats}",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- inputs: {family_info['params'] / 1e9:.3f}B params, 3 × {_gb(family_info['bytes'])} GB bf16; {cache}",
        f"- machine: {info['cpus']} CPUs ({info['cpu']}), {info['ram']} RAM; load average {loads[0]:.1f} at "
        f"start, {loads[1]:.1f} at end (other users share the CPUs)",
        f"- {info['ours']}; {info['mergekit']}",
        f"- harness high-water RSS at spawn (Linux passes it on to each child's ru_maxrss, so a lower bound for "
        f"the peaks below): {_gb(max(summaries[v.label]['harness_hwm'] for v in variants))} GB",
        "",
        "| run | wall median (s) | min–max (s) | CPU median (s) | peak RSS max (GB) | sampled anon / file "
        "peak (GB) | sync after (s) | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        s = summaries[v.label]
        lines.append(
            f"| {v.label} | {s['wall_median']:.1f} | {s['wall_min']:.1f}–{s['wall_max']:.1f} | "
            f"{s['cpu_median']:.1f} | {_gb(s['peak_rss_max'])} | {_gb(s['anon_peak_max'])} / "
            f"{_gb(s['file_peak_max'])} | {s['post_sync_median']:.1f} | {s['load_median']:.1f} |"
        )
    lines += ["", *ratio_lines(variants, summaries), *check_lines(checks)]
    return "\n".join(lines) + "\n"


def ratio_lines(variants: list[Variant], summaries: dict[str, dict[str, float]]) -> list[str]:
    ours = [v for v in variants if v.tool == "ours"]
    others = [v for v in variants if v.tool != "ours"]
    out = []
    for o in ours:
        for v in others:
            r = summaries[v.label]["wall_median"] / summaries[o.label]["wall_median"]
            c = summaries[v.label]["cpu_median"] / summaries[o.label]["cpu_median"]
            if v.tool == "mergekit":
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
        ea, eb = main_check["exact_a"], main_check["exact_b"]
        if ea["elements"]:
            lines += [
                f"- vs the exact float64 result on {len(main_check['exact_tensors'])} tensors "
                f"({ea['elements'] / 1e6:.1f}M elements: {', '.join(main_check['exact_tensors'][:6])}"
                f"{', ...' if len(main_check['exact_tensors']) > 6 else ''}):",
                "",
                "| output | correctly rounded | max abs error | mean abs error | RMS error | max distance from "
                "the correctly rounded value |",
                "|---|---:|---:|---:|---:|---:|",
                f"| ours (float32 compute, one cast) | {ea['correctly_rounded_frac'] * 100:.3f}% | "
                f"{ea['max_abs']:.3g} | {ea['mean_abs']:.3g} | {ea['rms']:.3g} | {ea['max_vs_rounded']:.3g} |",
                f"| mergekit (bf16 compute) | {eb['correctly_rounded_frac'] * 100:.3f}% | {eb['max_abs']:.3g} | "
                f"{eb['mean_abs']:.3g} | {eb['rms']:.3g} | {eb['max_vs_rounded']:.3g} |",
            ]
    others = [(name, rep) for name, rep in checks.items() if name != "ours_vs_mergekit" and isinstance(rep, dict)]
    if others:
        lines.append("")  # end the table above
    for name, rep in others:
        lines.append(f"- {name}: {rep['agreement']['bitwise_equal_frac'] * 100:.3f}% bitwise equal")
    return [*lines, ""] if lines else []


RESULTS_HEADER = """# Benchmark results: mergekitlite `merge` vs mergekit

Generated by `bench/run_bench.py` (sections are appended, newest last). To reproduce:

```sh
.venv/bin/python bench/make_family.py --preset 1.3b          # optional: run_bench generates it too
.venv/bin/python bench/run_bench.py --preset 1.3b            # N=3 interleaved rounds
.venv/bin/python bench/run_bench.py --preset 2.6b -n 3
.venv/bin/python bench/run_bench.py --preset 1.3b -n 2 --tools ours,mergekit \\
    --ours-args "" --ours-args "-j 1" --mk-args "" --mk-args "--out-shard-size 1B"
```

mergekit runs from its own venv (`/work/mkvenv/bin/mergekit-yaml`: `pip install torch==2.13.0 && pip install
mergekit`). The recipe is task_arithmetic (base + 1.0·(ft1 − base) + 1.0·(ft2 − base), `dtype: bfloat16`)
over a generated Llama family (bench/make_family.py: bf16, 2 GB shards, fine-tunes = base + seeded noise of
5% of the weights' std); both tools read the same YAML file. Ours: `merge RECIPE OUT --overwrite --no-hash`
run from a frozen copy of `mergekitlite/` (bench/.work/snapshots/<digest>, via PYTHONPATH: the repo changes
while a benchmark runs); mergekit: `mergekit-yaml RECIPE OUT` with default options. Each row is a
separate process:

- **wall**: from spawn to exit (includes interpreter start and imports, ~2–4 s of `import torch` here);
  median and min–max over the rounds. **CPU**: user + system time of the process (less sensitive to
  other users than wall time, but inflated by cache and memory-bandwidth contention too).
- **peak RSS**: the kernel's high-water mark of the whole process (`os.wait4` rusage). The sampled
  anon / file split (polling /proc every 20 ms) shows allocated memory vs file-backed pages: shared
  libraries (~0.1 GB for torch) and, for mergekit, the mmap'd input checkpoints (reclaimable).
- **sync after**: `sync` right after the process exits (untimed): the writeback the tool left behind.
  `merge` fsyncs as it goes (its resume journal needs durable data), mergekit never fsyncs.
- **floor**: `bench/io_floor.py`, no arithmetic: reads the fine-tunes' shards and copies the base's
  shards (= output-sized) with a 16 MiB buffer; once with fsync at merge's interval, once without.

The page cache is warmed before the first round; outputs are deleted and `sync` is run between runs.
Timings are noisy: the 2 CPUs are shared with other work (see the load column: 1-minute load
average when each run started); rounds are interleaved so that noise spreads over all tools, and
medians are reported. The harness itself (the /proc sampler) uses ~3% of one CPU.

"""


def append_results(path: Path, section: str) -> None:
    if not path.exists():
        path.write_text(RESULTS_HEADER)
    with open(path, "a") as f:
        f.write("\n" + section)


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(make_family.PRESETS), default="tiny")
    ap.add_argument("-n", "--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="family seed (make_family.py)")
    ap.add_argument("--tools", default="ours,mergekit,floor", help="comma-separated subset of ours,mergekit,floor")
    ap.add_argument(
        "--ours-args",
        action="append",
        help="extra args for merge, e.g. '-j 2' (repeat for more "
        "variants; use --ours-args=-j2 for a single token starting with '-')",
    )
    ap.add_argument(
        "--mk-args",
        action="append",
        help="extra args for mergekit-yaml, e.g. '--out-shard-size 1B' (repeat for more variants)",
    )
    ap.add_argument("--exact", default=DEFAULT_EXACT, help="tensors checked against float64: 'all', 'none' or names")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument(
        "--cold", action="store_true", help="evict the inputs from the page cache before every run (reads hit the disk)"
    )
    ap.add_argument("--no-snapshot", action="store_true", help="run the live repo code instead of a frozen copy")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the last round's outputs in .work/<preset>/out")
    ap.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--results", type=Path, default=RESULTS_MD)
    ap.add_argument("--merge-bin", type=Path, default=MERGE_BIN)
    ap.add_argument("--mergekit-bin", type=Path, default=MERGEKIT_BIN)
    args = ap.parse_args(argv)
    args.ours_args = args.ours_args or [""]
    args.mk_args = args.mk_args or [""]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()[0]
    family = make_family.family_dir(args.preset)
    if not make_family.is_current(args.preset, args.seed):
        # In a child process: generating here would raise this process's RSS high-water mark,
        # which every later child inherits in its ru_maxrss.
        subprocess.run(
            [sys.executable, str(BENCH / "make_family.py"), "--preset", args.preset, "--seed", str(args.seed)],
            check=True,
        )
    specs = make_family.tensor_specs(make_family.PRESETS[args.preset])
    family_info = {"params": sum(s.numel for s in specs), "bytes": sum(s.nbytes for s in specs)}
    recipe = family / "task_arithmetic.yaml"
    recipe.write_text(recipe_text(family))
    code_root, digest = (None, "live code") if args.no_snapshot else snapshot_code()
    env = child_env(code_root)
    where, sync_every, kernel = probe_code(env)
    code = f"code {digest}" if code_root is None else f"code snapshot {digest}"
    code += f", native kernel: {kernel}"
    print(f"mergekitlite imported from {where}")
    if code_root is not None and not Path(where).is_relative_to(code_root):
        raise SystemExit(f"the snapshot is not what the children import ({where}); use --no-snapshot")
    variants = build_variants(args, family, recipe, sync_every)
    info = machine_info(args, code)
    print(json.dumps(info, indent=2))

    inputs = [p for m in make_family.MODELS for p in shards(family / m)]
    if args.cold:
        evict(inputs)  # then warm_cache times a plain sequential read from the disk
    warm = warm_cache(inputs)
    print(f"page cache warmed: {warm[0] / 1e9:.2f} GB in {warm[1]:.1f} s", flush=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = WORK / "logs" / f"{args.preset}-{stamp}"
    runs = run_rounds(variants, args.repeats, logs, env, inputs if args.cold else None)
    summaries = {label: summarize(r) for label, r in runs.items()}

    checks = {} if args.no_verify else verify(variants, family, args.exact)
    loads = (load_start, os.getloadavg()[0])
    section = markdown(args, info, family_info, summaries, variants, checks, warm, started, loads)
    print("\n" + section)

    results_dir = WORK / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    raw = {
        "args": vars(args)
        | {"results": str(args.results), "merge_bin": str(args.merge_bin), "mergekit_bin": str(args.mergekit_bin)},
        "machine": info,
        "runs": {k: [s.as_dict() for s in v] for k, v in runs.items()},
        "summaries": summaries,
        "checks": checks,
    }
    (results_dir / f"{args.preset}-{stamp}.json").write_text(json.dumps(raw, indent=2) + "\n")
    if not args.no_write:
        append_results(args.results, section)
        print(f"appended to {args.results}")
    if not args.keep_outputs:
        for v in variants:
            clear_output(v.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
