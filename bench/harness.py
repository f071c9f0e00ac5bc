"""What the measuring scripts (run_bench.py, parity.py, startup.py) share: the code under test, their
common flags, the machine's description and where results go.

The code under test is a frozen copy of ``mergekitlite/`` (bench/.work/snapshots/<digest>, put first on
the children's PYTHONPATH): others commit to the repo while a benchmark runs (a 20-minute run once
straddled an executor rewrite), so every round runs one copy, and the digest says exactly what was
measured. ``--code`` takes this checkout (the default), another folder holding ``mergekitlite/`` or a git
revision, so two versions can be measured side by side. This module imports no torch (see procstats).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from procstats import RunStats

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / ".work"
RESULTS_MD = BENCH / "RESULTS.md"
MERGE_BIN = REPO / ".venv" / "bin" / "merge"
MERGEKIT_BIN = Path("/work/mkvenv/bin/mergekit-yaml")
SYNC_EVERY_FALLBACK = 512 * 1024 * 1024  # if ExecContext.sync_every_bytes cannot be read from the code under test


# ---------------------------------------------------------------- the code under test
def git(*args: str, cwd: Path = REPO) -> str | None:
    done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def checkout_state(folder: Path) -> str:
    head = git("rev-parse", "--short", "HEAD", cwd=folder)
    if head is None:
        return "not a git checkout"
    dirty = git("status", "--porcelain", "--", "mergekitlite", cwd=folder)
    return f"HEAD {head}" + (" + uncommitted changes in mergekitlite/" if dirty else "")


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _build_kernels(root: Path, rev: str) -> str:
    """A git revision carries the native kernels' sources, not their builds: build them in the snapshot with
    that revision's own setup.py (same compiler flags as its install), so an older version is measured with
    its kernels; a failed build is said in the report."""
    setup = git("show", f"{rev}:setup.py")
    if setup is None:
        return "; it has no setup.py (no native kernel)"
    (root / "setup.py").write_text(setup + "\n")
    done = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=root, capture_output=True, text=True
    )
    (root / "setup.py").unlink()
    shutil.rmtree(root / "build", ignore_errors=True)
    built = sorted(p.name for p in (root / "mergekitlite").glob("*.so"))
    if done.returncode != 0 or not built:
        return "; its native kernels did not build, so it runs without them"
    return f"; its native kernels built in the snapshot ({', '.join(built)})"


def snapshot(source: str) -> tuple[Path, str]:
    """Freeze ``source`` (a folder holding mergekitlite/, or a git revision of this repo) under
    .work/snapshots/<digest>/mergekitlite; returns (that root, a description for reports)."""
    tmp = WORK / "snapshots" / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    folder = Path(source)
    if (folder / "mergekitlite").is_dir():
        shutil.copytree(folder / "mergekitlite", tmp / "mergekitlite", ignore=shutil.ignore_patterns("__pycache__"))
        origin = f"{folder.resolve()} ({checkout_state(folder)})"
    else:
        rev = git("rev-parse", "--short", "--verify", "--quiet", f"{source}^{{commit}}")
        if rev is None:
            raise SystemExit(f"--code {source}: neither a folder holding mergekitlite/ nor a git revision of {REPO}")
        tar = subprocess.run(["git", "-C", str(REPO), "archive", rev, "mergekitlite"], capture_output=True, check=True)
        with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
            archive.extractall(tmp, filter="data")
        origin = f"git {source} ({rev}){_build_kernels(tmp, rev)}"
    digest = tree_digest(tmp / "mergekitlite")
    root = WORK / "snapshots" / digest
    if (root / "mergekitlite").exists():
        shutil.rmtree(tmp)
    else:
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root, f"snapshot {digest} of {origin}"


def child_env(code_root: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    # Local paths only: never let a tool wait on the network (there is none here).
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    if code_root is not None:
        # Ahead of the editable install's finder (which sits after the path finder in sys.meta_path).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code_root), env.get("PYTHONPATH")]))
    return env


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


@dataclass(frozen=True)
class Code:
    """One version of mergekitlite, as the measured processes import it."""

    label: str
    env: dict[str, str]
    desc: str
    sync_every: int


def prepare_code(source: str | None, label: str) -> Code:
    """``source`` frozen as a snapshot (None: the installed, live code), checked to be what children import."""
    root, desc = (None, f"live code, {checkout_state(REPO)}") if source is None else snapshot(source)
    env = child_env(root)
    where, sync_every, kernel = probe_code(env)
    print(f"{label}: mergekitlite imported from {where}")
    if root is not None and not Path(where).is_relative_to(root):
        raise SystemExit(f"the snapshot is not what the children import ({where}); use --no-snapshot")
    return Code(label, env, f"{desc}, native kernel: {kernel}", sync_every)


def codes_under_test(args: argparse.Namespace, most: int = 1) -> list[Code]:
    sources = args.code or [str(REPO)]
    if args.no_snapshot and args.code:
        raise SystemExit("--no-snapshot runs the installed code: give no --code with it")
    if len(sources) > most:
        raise SystemExit(f"at most {most} --code here")
    if args.no_snapshot:
        return [prepare_code(None, "ours")]
    labels = ["ours"] if len(sources) == 1 else [chr(ord("A") + i) for i in range(len(sources))]
    return [prepare_code(src, label) for src, label in zip(sources, labels, strict=True)]


# ---------------------------------------------------------------- flags
def count(text: str) -> int:
    """An element count with a binary suffix: 64K = 65,536, 4M, 1G (the micro-benchmarks' sizes)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def add_flags(ap: argparse.ArgumentParser, *, repeats: int, tools: bool = True, codes: int = 1) -> None:
    """The flags every measuring script takes; with ``tools``, those of scripts that run merge and mergekit."""
    ap.add_argument("-n", "--repeats", type=int, default=repeats, help="interleaved rounds")
    ap.add_argument(
        "--code",
        action="append",
        default=[],
        metavar="SOURCE",
        help="the mergekitlite measured: a folder holding mergekitlite/ or a git revision of this repo, frozen as "
        "a snapshot (default: this checkout)" + (f"; up to {codes}, measured side by side" if codes > 1 else ""),
    )
    ap.add_argument("--no-snapshot", action="store_true", help="run the installed (live) code instead of a frozen copy")
    ap.add_argument("--no-write", action="store_true", help="do not append to the results file")
    ap.add_argument("--results", type=Path, default=RESULTS_MD)
    ap.add_argument(
        "--merge-bin", type=Path, default=MERGE_BIN, help="our `merge` (its folder also has `mergekitlite`)"
    )
    if not tools:
        return
    ap.add_argument("--seed", type=int, default=0, help="family seed (bench/make_family.py)")
    ap.add_argument(
        "--ours-args",
        action="append",
        help="extra args for merge, e.g. '-j 2' (use --ours-args=-j2 for a single token starting with '-')",
    )
    ap.add_argument("--mk-args", action="append", help="extra args for mergekit-yaml, e.g. '--out-shard-size 1B'")
    ap.add_argument("--no-check", "--no-verify", action="store_true", help="timings only: compare no outputs")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the last round's outputs")
    ap.add_argument("--mergekit-bin", type=Path, default=MERGEKIT_BIN)


# ---------------------------------------------------------------- the machine and the results
def _version_in(python: Path, *packages: str) -> dict[str, str]:
    code = "import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    try:
        out = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)
    except (OSError, subprocess.CalledProcessError, json.JSONDecodeError):
        return dict.fromkeys(packages, "?")


def machine_info(codes: list[Code], mergekit_bin: Path | None) -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.processor())
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = next(int(ln.split()[1]) for ln in meminfo if ln.startswith("MemTotal"))
    ours = _version_in(Path(sys.executable), "mergekitlite", "torch", "safetensors")
    info = {
        "cpus": str(os.cpu_count()),
        "ram": f"{mem_kb / 1024**2:.1f} GiB",
        "cpu": cpu,
        "python": platform.python_version(),
        "ours": f"mergekitlite {ours['mergekitlite']}; torch {ours['torch']}, safetensors {ours['safetensors']}; "
        + "; ".join(f"{c.label}: {c.desc}" for c in codes),
    }
    if mergekit_bin is not None:
        mk = _version_in(mergekit_bin.parent / "python", "mergekit", "torch", "transformers")
        info["mergekit"] = f"mergekit {mk['mergekit']}, torch {mk['torch']}, transformers {mk['transformers']}"
    return info


class Session:
    """One invocation: its clock, logs, raw results (.work/results/NAME-STAMP.json) and report section."""

    def __init__(self, name: str) -> None:
        self.started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.name = f"{name}-{self.stamp}"
        self.load_start = os.getloadavg()[0]
        self.t0 = time.perf_counter()
        self.logs = WORK / "logs" / self.name

    def head(self, title: str, info: dict[str, str]) -> list[str]:
        """The section's title and the lines every report starts with."""
        tools = info["ours"] + (f"; {info['mergekit']}" if "mergekit" in info else "")
        return [
            f"## {self.started} — {title}",
            "",
            f"- command: `{' '.join(shlex.quote(a) for a in sys.argv)}`",
            f"- machine: {info['cpus']} CPUs ({info['cpu']}), {info['ram']} RAM, Python {info['python']}; load "
            f"average {self.load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end (other users share the "
            f"CPUs); the run took {(time.perf_counter() - self.t0) / 60:.1f} min",
            f"- {tools}",
        ]

    def finish(
        self,
        args: argparse.Namespace,
        section: str,
        info: dict[str, str],
        runs: dict[str, list[RunStats]],
        **extra: object,
    ) -> None:
        """Print the section, write the raw results, append the section to --results unless --no-write."""
        print("\n" + section)
        results = WORK / "results" / f"{self.name}.json"
        results.parent.mkdir(parents=True, exist_ok=True)
        raw = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": info,
            "runs": {label: [s.as_dict() for s in rs] for label, rs in runs.items()},
            **extra,
        }
        results.write_text(json.dumps(raw, indent=2) + "\n")
        print(f"raw results: {results}")
        if not args.no_write:
            with open(args.results, "a") as f:
                f.write("\n" + section)
            print(f"appended to {args.results}")
