"""`mergekitlite evolve --ray` on a real local Ray cluster of two nodes (a head and a worker, one CPU each, both
started and stopped here): the worker node is killed while it runs a trial, Ray runs that trial again on the
head, and the study finishes with every trial complete. The nodes share this machine's filesystem, as the
README says the nodes of a real cluster must (models, texts and task files at the same paths everywhere)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from evolve_helpers import wait_for, write_cheap_spec

RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Every port a node opens, chosen free: other Ray clusters on this machine must not collide with ours."""
    args = []
    for flag in (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-grpc-port",
        "--dashboard-agent-listen-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
    ):
        args += [flag, str(_free_port())]
    return args


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += tree.get(p, [])
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_tree(pid: int) -> None:
    for p in _descendants(pid):  # Ray's workers sit in process groups of their own: kill them one by one
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


class Node:
    def __init__(self, args: list[str], log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [str(RAY), "start", *args, "--block"],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._started, 180, f"ray start ({log.name})", log)

    def _started(self) -> bool:
        if self.proc.poll() is not None:  # it gave up: say why at once
            raise AssertionError(f"ray start exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return "Ray runtime started" in self.log.read_text()

    def kill(self) -> None:
        _kill_tree(self.proc.pid)
        self.proc.wait(30)


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[tuple[str, Node, Node]]:
    # Ray's unix socket paths must stay under ~107 bytes: a short folder when tmp_path is too deep for them.
    temp = tmp_path / "ray" if len(str(tmp_path)) < 40 else Path(tempfile.mkdtemp(prefix="mklray", dir="/tmp"))
    port = _free_port()
    common = ["--num-cpus", "1", "--temp-dir", str(temp), "--disable-usage-stats", "--object-store-memory", "100000000"]
    head = Node(
        [
            "--head",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--dashboard-port",
            str(_free_port()),
            *common,
            *_node_ports(),
        ],
        tmp_path / "head.log",
    )
    worker = None
    try:
        worker = Node(["--address", f"127.0.0.1:{port}", *common, *_node_ports()], tmp_path / "worker.log")
        yield f"127.0.0.1:{port}", head, worker
    finally:
        for node in (worker, head):
            if node is not None and node.proc.poll() is None:
                node.kill()


def test_search_on_a_ray_cluster_survives_a_node_killed_mid_trial(tmp_path: Path, ray_cluster) -> None:
    address, _head, worker = ray_cluster
    spec = write_cheap_spec(tmp_path / "spec.yaml", "ray-search", trials=4)
    out = tmp_path / "results"
    log = tmp_path / "evolve.log"
    search = subprocess.Popen(
        [sys.executable, "-m", "mergekitlite.cli", "evolve", str(spec), "--output", str(out), "--ray", address, "-q"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        # A trial is running on the worker node when its worker process is titled after our task.
        def running_there() -> list[int]:
            return [p for p in _descendants(worker.proc.pid) if _cmdline(p).startswith("ray::ray_trial")]

        busy = wait_for(running_there, 240, "a trial on the worker node", log)
        worker.kill()  # the whole node: raylet, agents and the worker in the middle of its trial
        wait_for(lambda: all("ray::" not in _cmdline(p) for p in busy), 30, "the killed trial's worker to be gone")
        assert search.wait(300) == 0, log.read_text()[-3000:]
    finally:
        if search.poll() is None:
            search.kill()
    study = optuna.load_study(study_name="ray-search", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * 4, states  # Ray re-ran the lost trial: none failed
    assert (out / "best.yaml").is_file()
