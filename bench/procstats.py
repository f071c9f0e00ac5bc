"""Run a command and measure it: wall time, CPU time, and whole-process peak memory.

The command is exec'd directly (no shell), so the process we wait for is the merging process
itself. Its peak RSS comes from ``os.wait4``'s rusage (the kernel's high-water mark, exact, and it
includes any children the process waited for). Caveat: Linux carries the *parent's* high-water mark
over fork+exec into the child's ru_maxrss, so the harness must stay small (it records its own as
``harness_hwm``); the sampled VmHWM (the exec'd image's own mark) cross-checks it. A sampler thread polls
``/proc/<pid>/status`` of the process tree every few ms for the *split* of RSS into anonymous
memory (what the process really allocated) and file-backed pages (mmap'd checkpoints, which
the kernel can drop and which are why an mmap-based tool "looks" big in top); sampling can miss
a short spike, the wait4 number cannot.
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
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
    sampled: dict[str, int] = field(default_factory=dict)  # peak of each /proc field summed over the tree, bytes
    loadavg_before: float = 0.0
    harness_hwm: int = 0  # this process's ru_maxrss when the child was spawned: a floor for peak_rss
    extra: dict[str, float] = field(default_factory=dict)  # what the command itself reported (floor worker)

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
    label: str, cmd: list[str], log: Path, env: dict[str, str] | None = None, interval: float = 0.02
) -> RunStats:
    """Run ``cmd`` with stdout+stderr to ``log``; return its measurements."""
    log.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    harness = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
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
        sampled=dict(sampler.peaks),
        loadavg_before=load,
        harness_hwm=harness,
    )
