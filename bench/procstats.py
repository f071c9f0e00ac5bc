"""Run commands as whole processes, interleaved round by round, and measure each one.

A command is exec'd directly (no shell), so the process we wait for is the measured process itself.
Its peak RSS, CPU times and page faults come from ``os.wait4``'s rusage (the kernel's counts, exact;
they include any children the process waited for). Caveat: Linux carries the *parent's* high-water
mark over fork+exec into the child's ru_maxrss, so the harness must stay small (it records its own as
``harness_hwm``, and must not import torch); the sampled VmHWM (the exec'd image's own mark)
cross-checks it. A sampler thread polls ``/proc/<pid>/status`` of the process tree every few ms for the
*split* of RSS into anonymous memory (what the process really allocated) and file-backed pages (mmap'd
checkpoints, which the kernel can drop and which are why an mmap-based tool "looks" big in top);
sampling can miss a short spike, the wait4 number cannot.

``interleave`` runs groups of jobs N times, round by round (A, B, C, A, B, C, ...), so that load from
other users of the machine spreads over all of them; before each run the job's output is deleted and
``sync`` is called (untimed), so that one run's writeback does not land in the next.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


@dataclass
class RunStats:
    label: str
    cmd: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss: int  # bytes, from wait4 (ru_maxrss)
    minor_faults: int = 0
    major_faults: int = 0  # pages read from the disk
    sampled: dict[str, int] = field(default_factory=dict)  # peak of each /proc field summed over the tree, bytes
    loadavg_before: float = 0.0
    harness_hwm: int = 0  # this process's ru_maxrss when the child was spawned: a floor for peak_rss
    extra: dict[str, float] = field(default_factory=dict)  # measured around the run, or reported by the command
    log: str = ""

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["cpu_s"] = self.cpu_s
        return d


def _children(pid: int) -> list[int]:
    """Direct and indirect children, from /proc/<pid>/task/*/children (no psutil needed)."""
    out: list[int] = []
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
            except OSError:
                continue
            for k in kids:
                out.append(int(k))
                stack.append(int(k))
    return out


def _status_kb(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in _FIELDS:
            values[key] = int(rest.split()[0]) * 1024
    return values


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peaks: dict[str, int] = dict.fromkeys(_FIELDS, 0)
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            totals = dict.fromkeys(_FIELDS, 0)
            for pid in [self.pid, *_children(self.pid)]:
                for key, value in _status_kb(pid).items():
                    totals[key] += value
            for key, value in totals.items():
                self.peaks[key] = max(self.peaks[key], value)
            self.stop_event.wait(self.interval)


def run_measured(
    label: str,
    cmd: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    interval: float = 0.02,
    cwd: Path | None = None,
) -> RunStats:
    """Run ``cmd`` (in ``cwd``) with stdout+stderr to ``log``; return its measurements."""
    log.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    harness = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        sampler = _Sampler(proc.pid, interval)
        sampler.start()
        # wait4 (not proc.wait) because it returns the child's rusage: exact peak RSS and CPU times.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        sampler.stop_event.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it has been reaped
    return RunStats(
        label=label,
        cmd=cmd,
        returncode=proc.returncode,
        wall_s=wall,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        peak_rss=usage.ru_maxrss * 1024,  # Linux reports KiB
        minor_faults=usage.ru_minflt,
        major_faults=usage.ru_majflt,
        sampled=dict(sampler.peaks),
        loadavg_before=load,
        harness_hwm=harness,
        log=str(log),
    )


# ---------------------------------------------------------------- the page cache and outputs
def read_files(files: Sequence[Path]) -> tuple[int, float]:
    """Read every byte of ``files`` once through one 16 MiB buffer: (bytes, seconds). Warms the page cache
    before timed runs, and is the read half of the I/O floor (io_floor.py)."""
    buf = bytearray(16 * 1024 * 1024)
    total = 0
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total, time.perf_counter() - started


def evict(files: Sequence[Path]) -> None:
    """Drop files from the page cache (POSIX_FADV_DONTNEED on clean pages needs no root), so the next run
    reads them from the disk, as a first merge of freshly downloaded models does."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def clear_output(out: Path) -> None:
    for path in (out, out.with_name(out.name + ".partial")):
        if path.exists():
            shutil.rmtree(path)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")


# ---------------------------------------------------------------- interleaved rounds
@dataclass(frozen=True)
class Job:
    label: str
    cmd: list[str]
    env: dict[str, str] | None = None
    out: Path | None = None  # the job's output folder: deleted (with OUT.partial) before each run
    cwd: Path | None = None


@dataclass
class Rounds:
    runs: dict[str, list[RunStats]]
    skipped: dict[str, str] = field(default_factory=dict)  # label -> why (a failed run, with skip_failed)


def failure_reason(log: Path) -> str:
    """The last informative line of a failed run's log (the exception, usually)."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Exception" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def run_job(job: Job, log: Path, cold: Sequence[Path] = ()) -> RunStats:
    if job.out is not None:
        clear_output(job.out)
    os.sync()  # flush the previous run's writeback before the clock starts
    evict(cold)
    stats = run_measured(job.label, job.cmd, log, env=job.env, cwd=job.cwd)
    started = time.perf_counter()
    os.sync()  # what the process left to write back (mergekit never fsyncs)
    stats.extra["post_sync_s"] = time.perf_counter() - started
    return stats


def interleave(
    groups: Sequence[Sequence[Job]],
    repeats: int,
    logs: Path,
    *,
    alternate: bool = False,
    skip_failed: bool = False,
    cold: Sequence[Path] = (),
    on_run: Callable[[int, RunStats], None] | None = None,
    after_group: Callable[[int, Sequence[Job], Rounds], None] | None = None,
) -> Rounds:
    """Round r runs every group, group by group; with ``alternate`` a group's jobs run in reverse order in
    every other round (and group), so that none always goes first. A failed run ends everything, or with
    ``skip_failed`` drops that job from later rounds (``Rounds.skipped`` says why). ``cold``: files
    evicted from the page cache before every run. ``on_run(r, stats)`` sees every run (to print it);
    ``after_group(r, group, rounds so far)`` runs after each group (untimed checks, cleaning up)."""
    result = Rounds({job.label: [] for group in groups for job in group})
    for r in range(1, repeats + 1):
        for g, group in enumerate(groups):
            for job in group if not alternate or (r + g) % 2 else group[::-1]:
                if job.label in result.skipped:
                    continue
                stats = run_job(job, logs / f"{slug(job.label)}-{r}.log", cold)
                if stats.returncode != 0:
                    if not skip_failed:
                        raise SystemExit(f"{job.label} failed (exit {stats.returncode}); see {stats.log}")
                    result.skipped[job.label] = f"exit {stats.returncode}: {failure_reason(Path(stats.log))}"
                else:
                    result.runs[job.label].append(stats)
                if on_run is not None:
                    on_run(r, stats)
            if after_group is not None:
                after_group(r, group, result)
    return result


def summarize(runs: Sequence[RunStats]) -> dict[str, float]:
    """Medians and extremes over the rounds (NaN for a job without a successful run)."""
    if not runs:
        keys = ("n", "wall_median", "cpu_median", "user_median", "sys_median", "peak_rss_max", "peak_rss_median")
        return dict.fromkeys(keys, float("nan"))
    walls = [s.wall_s for s in runs]
    return {
        "n": len(runs),
        "wall_median": statistics.median(walls),
        "wall_min": min(walls),
        "wall_max": max(walls),
        "cpu_median": statistics.median(s.cpu_s for s in runs),
        "user_median": statistics.median(s.user_s for s in runs),
        "sys_median": statistics.median(s.sys_s for s in runs),
        "peak_rss_max": max(s.peak_rss for s in runs),
        "peak_rss_median": statistics.median(s.peak_rss for s in runs),
        "minor_faults_median": statistics.median(s.minor_faults for s in runs),
        "major_faults_median": statistics.median(s.major_faults for s in runs),
        "anon_peak_max": max(s.sampled.get("RssAnon", 0) for s in runs),
        "file_peak_max": max(s.sampled.get("RssFile", 0) for s in runs),
        "post_sync_median": statistics.median(s.extra.get("post_sync_s", 0.0) for s in runs),
        "load_median": statistics.median(s.loadavg_before for s in runs),
        "harness_hwm": max(s.harness_hwm for s in runs),
        "vmhwm_sampled_max": max(s.sampled.get("VmHWM", 0) for s in runs),
    }
