"""Start-up cost of the CLI, as whole processes: ``merge --help``, ``validate``, ``plan`` and a tiny merge.

    python bench/startup.py                              # this checkout, N=10, appends to bench/RESULTS.md
    python bench/startup.py --code HEAD~3 --code .       # before / after, interleaved, side by side
    python bench/startup.py -n 1 --no-write              # quick check

Each command runs from the repo root (recipes/demo.yaml names its models relative to it) against a
frozen snapshot of mergekitlite/ per ``--code`` (bench/harness.py), the snapshots' runs interleaved
round by round in alternating order; reported are medians over N of wall time, CPU time, peak RSS and
page faults (bench/procstats.py). Before the timed rounds each command runs once untimed with
``PYTHONPROFILEIMPORTTIME=1`` (what ``python -X importtime`` prints, for a console script): the total
import time and the imports that cost most. That run also warms the page cache for the timed rounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import harness
from procstats import Job, RunStats, interleave, slug, summarize

RECIPE = "recipes/demo.yaml"
COMMANDS: dict[str, list[str]] = {  # {out}: a scratch output folder
    "merge --help": ["merge", "--help"],
    "validate": ["mergekitlite", "validate", RECIPE],
    "plan": ["mergekitlite", "plan", RECIPE],
    "merge (tiny)": ["merge", RECIPE, "{out}", "--overwrite", "--no-hash"],
}


@dataclass(frozen=True)
class Import:
    name: str
    self_us: int
    cumulative_us: int


def parse_importtime(stderr: str) -> list[Import]:
    """The lines ``import time: SELF | CUMULATIVE | NAME`` (microseconds; NAME indented by depth)."""
    out = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        self_us, cumulative, name = line.removeprefix("import time:").split("|", 2)
        out.append(Import(name.strip(), int(self_us), int(cumulative)))
    return out


def heaviest(imports: list[Import], top: int) -> list[Import]:
    """The most expensive top-level packages and modules of mergekitlite, by cumulative time (a package's
    cumulative time includes what it imports: what not importing it would save)."""
    mine = [i for i in imports if "." not in i.name or i.name.startswith("mergekitlite.")]
    return sorted(mine, key=lambda i: -i.cumulative_us)[:top]


def command(name: str, args: argparse.Namespace, out: Path) -> list[str]:
    tool, *rest = COMMANDS[name]
    return [str(args.merge_bin.parent / tool), *(str(out) if a == "{out}" else a for a in rest)]


def jobs(args: argparse.Namespace, codes: list[harness.Code]) -> list[Job]:
    out = harness.WORK / "startup"
    return [
        Job(
            f"{name} [{code.label}]",
            command(name, args, out / slug(code.label)),
            code.env,
            out / slug(code.label),
            harness.REPO,
        )
        for name in COMMANDS
        for code in codes
    ]


def import_times(job: Job, top: int) -> dict[str, object]:
    done = subprocess.run(
        job.cmd, cwd=job.cwd, env={**(job.env or {}), "PYTHONPROFILEIMPORTTIME": "1"}, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{job.label} failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    imports = parse_importtime(done.stderr)
    return {
        "total_ms": sum(i.self_us for i in imports) / 1000,
        "modules": len(imports),
        "heaviest": [(i.name, i.cumulative_us / 1000) for i in heaviest(imports, top)],
    }


def markdown(head: list[str], codes: list[harness.Code], summaries: dict, imports: dict, n: int) -> str:
    first = codes[0].label
    ratio_col = f" {'/'.join(c.label for c in codes[1:])} / {first} (wall) |" if len(codes) > 1 else ""
    lines = [
        *head,
        f"- each command from the repo root, `{RECIPE}` (the shipped demo family), interleaved rounds in "
        f"alternating order, medians of N={n}",
        "",
        f"| command | code | wall median (s) | min–max (s) | CPU median (s) | peak RSS median (MB) | page faults "
        f"minor / major |{ratio_col}",
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if ratio_col else ""),
    ]
    for name in COMMANDS:
        base = summaries[f"{name} [{first}]"]["wall_median"]
        for code in codes:
            s = summaries[f"{name} [{code.label}]"]
            ratio = "" if not ratio_col else " — |" if code.label == first else f" {s['wall_median'] / base:.2f}× |"
            lines.append(
                f"| {name} | {code.label} | {s['wall_median']:.2f} | {s['wall_min']:.2f}–{s['wall_max']:.2f} | "
                f"{s['cpu_median']:.2f} | {s['peak_rss_median'] / 1e6:.0f} | {s['minor_faults_median']:.0f} / "
                f"{s['major_faults_median']:.0f} |{ratio}"
            )
    lines += [
        "",
        "Imports (`PYTHONPROFILEIMPORTTIME=1`, one untimed run each): total self time, and the heaviest top-level "
        "packages and mergekitlite modules by cumulative time:",
        "",
        "| command | code | modules | import time (ms) | heaviest (cumulative ms) |",
        "|---|---|---:|---:|---|",
    ]
    for label, imp in imports.items():
        name, code = label.rsplit(" [", 1)
        heavy = ", ".join(f"`{mod}` {ms:.0f}" for mod, ms in imp["heaviest"])
        lines.append(f"| {name} | {code.rstrip(']')} | {imp['modules']} | {imp['total_ms']:.0f} | {heavy} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_flags(ap, repeats=10, tools=False, codes=4)
    ap.add_argument("--top", type=int, default=6, help="heaviest imports listed per command")
    args = ap.parse_args(argv)
    session = harness.Session("startup")
    codes = harness.codes_under_test(args, most=4)
    info = harness.machine_info(codes, None)
    print(json.dumps(info, indent=2))
    all_jobs = jobs(args, codes)
    imports = {job.label: import_times(job, args.top) for job in all_jobs}

    def show(r: int, s: RunStats) -> None:
        print(f"round {r}/{args.repeats} {s.label:28s} {s.wall_s:6.2f} s wall {s.cpu_s:6.2f} s CPU", flush=True)

    # One group per command, so that the versions of one command run back to back, first one, then the other.
    groups = [all_jobs[i : i + len(codes)] for i in range(0, len(all_jobs), len(codes))]
    rounds = interleave(groups, args.repeats, session.logs, alternate=True, on_run=show)
    summaries = {label: summarize(runs) for label, runs in rounds.runs.items()}
    head = session.head(f"start-up, {', '.join(c.label for c in codes)}", info)
    section = markdown(head, codes, summaries, imports, args.repeats)
    session.finish(args, section, info, rounds.runs, summaries=summaries, imports=imports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
