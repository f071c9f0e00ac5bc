"""Real scale: the seed's 14B merge (three ~28 GB Qwen-14B checkpoints) against the write floor, with and
without fsync, to size the durability policy.

The inputs are bench/qwen14b_standins.py's header-only stand-ins (real names, shapes and dtype; the data is a
sparse hole, so reads cost no disk time and the numbers isolate the tool's own CPU, memory and writing). Each
round runs, as separate processes measured by bench/procstats.py (interleaved, N rounds):

* ``ours task_arithmetic``: ``recipes/nekoqarasu.yaml`` unchanged (base + nekomata + (qarasu − base)... as the
  seed wrote it), into a fresh folder;
* ``ours ties``: the same three models with ``merge_method: ties`` (density 0.5 each, as published TIES configs);
* ``floor fsync 1 GiB``: read every input byte once and write an output-sized copy of the base, fsyncing every
  1 GiB and at the end — what ``merge`` does for its resume journal (``ExecContext.sync_every_bytes``);
* ``floor fsync at end``: the same copy, one fsync at the end (what a finished merge needs before its rename);
* ``floor no fsync``: never fsynced (mergekit's behaviour; the writeback happens after the process exits, and
  ``post_sync_s`` shows how long it took).

    python bench/qwen14b_standins.py && python bench/scale14b.py -n 2

Needs about 30 GB free (one output at a time; each run's output is deleted before the next).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import harness
import yaml
from procstats import Job, RunStats, clear_output, interleave, summarize

CACHE = harness.WORK / "hf-cache"
GIB = 1 << 30


def snapshot_dir(repo: str) -> Path:
    folder = CACHE / f"models--{repo.replace('/', '--')}" / "snapshots"
    found = sorted(folder.iterdir()) if folder.exists() else []
    if not found:
        raise SystemExit(f"no stand-in of {repo} in {CACHE}: run bench/qwen14b_standins.py first")
    return found[0]


def recipes(work: Path) -> dict[str, Path]:
    """The seed's recipe unchanged, and its TIES variant."""
    seed = harness.REPO / "recipes" / "nekoqarasu.yaml"
    ties = yaml.safe_load(seed.read_text())
    ties.pop("output", None)
    ties["merge_method"] = "ties"
    for entry in ties["models"]:
        entry.setdefault("parameters", {})["density"] = 0.5
    path = work / "nekoqarasu-ties.yaml"
    path.write_text(yaml.safe_dump(ties, sort_keys=False))
    return {"task_arithmetic": seed, "ties": path}


def jobs(args: argparse.Namespace, work: Path, env: dict[str, str]) -> list[Job]:
    env = env | {"HF_HUB_CACHE": str(CACHE), "HF_HUB_OFFLINE": "1"}
    out = work / "out"
    merges = [
        Job(f"ours {name}", [str(args.merge_bin), str(recipe), str(out), "--no-hash", "-q"], env, out)
        for name, recipe in recipes(work).items()
    ]
    base = sorted(snapshot_dir("Qwen/Qwen-14B").glob("*.safetensors"))
    others = [
        f
        for repo in ("rinna/nekomata-14b", "lightblue/qarasu-14B-chat-plus-unleashed")
        for f in sorted(snapshot_dir(repo).glob("*.safetensors"))
    ]
    floor = [
        sys.executable,
        str(harness.BENCH / "io_floor.py"),
        str(out),
        "--copy",
        *map(str, base),
        "--read",
        *map(str, others),
        "--sync-every",
    ]
    floors = [
        Job("floor fsync 1 GiB", [*floor, str(GIB)], None, out),
        Job("floor fsync at end", [*floor, str(1 << 62)], None, out),
        Job("floor no fsync", [*floor, "0"], None, out),
    ]
    return merges + floors


def table(runs: dict[str, list[RunStats]]) -> list[str]:
    floor = summarize(runs["floor fsync 1 GiB"])["wall_median"]
    lines = [
        "| run | wall (s) | vs floor (fsync 1 GiB) | CPU user+sys (s) | writeback after exit (s) | peak RSS (GB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, rs in runs.items():
        s = summarize(rs)
        lines.append(
            f"| {label} | {s['wall_median']:.1f} ({s['wall_min']:.1f}–{s['wall_max']:.1f}) | "
            f"{s['wall_median'] / floor:.2f}× | {s['user_median']:.1f}+{s['sys_median']:.1f} | "
            f"{s['post_sync_median']:.1f} | {s['peak_rss_max'] / 1e9:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_flags(ap, repeats=2, tools=False)
    args = ap.parse_args(argv)
    session = harness.Session("scale14b")
    work = harness.WORK / "scale14b"
    work.mkdir(parents=True, exist_ok=True)
    (code,) = harness.codes_under_test(args)
    info = harness.machine_info([code], None)
    print(json.dumps(info, indent=2))
    all_jobs = jobs(args, work, code.env)

    def show(r: int, s: RunStats) -> None:
        print(
            f"round {r} {s.label:22s} {s.wall_s:7.1f} s wall {s.cpu_s:6.1f} s CPU {s.peak_rss / 1e9:5.2f} GB "
            f"post-sync {s.extra.get('post_sync_s', 0):.1f} s",
            flush=True,
        )

    rounds = interleave([all_jobs], args.repeats, session.logs, alternate=True, on_run=show)
    for job in all_jobs:
        if job.out is not None:
            clear_output(job.out)
    head = session.head(f"14B scale: the seed's merge and TIES vs the write floor, N={args.repeats}", info)
    body = [
        *head,
        "- inputs: bench/qwen14b_standins.py (Qwen-14B, nekomata-14b, qarasu-14B stand-ins: real names/shapes, "
        "bf16, 28.3 GB each, data a sparse hole: reads cost no disk time); output 28.3 GB per run on "
        f"`{os.statvfs(work).f_bsize}`-byte-block local disk",
        f"- merges: `merge RECIPE OUT --no-hash -q`, recipes `recipes/nekoqarasu.yaml` and its TIES variant "
        f"(density 0.5); floors: `bench/io_floor.py` ({shlex.quote('--sync-every')} 1 GiB / at end / never)",
        "",
        *table(rounds.runs),
        "",
    ]
    session.finish(args, "\n".join(body) + "\n", info, rounds.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
