"""Where trials run: local worker processes, or Ray tasks on a cluster.

Both take ``TrialJob``s and hand back ``(job, outcome or exception)`` as trials finish; the search loop drives
either the same way (ask a trial, submit it, tell its result). A worker that dies mid-trial (killed, out of
memory, its node gone) has its trial run again, up to ``max_retries`` times: Ray does it by itself
(``max_retries`` of the task, on any node that is alive); locally the pool is rebuilt and the job resubmitted.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from mergekitlite.errors import MergekitliteError
from mergekitlite.evolve.trial import TrialJob, TrialOutcome, exit_with_parent, quiet_worker, run_trial

Finished = tuple[TrialJob, "TrialOutcome | BaseException"]


class WorkerDied(MergekitliteError):
    """A trial's worker died more often than its retries allow (out of memory, killed, node lost)."""


class Executor(Protocol):
    where: str  # for messages: "2 local workers", "Ray cluster at ..."

    def capacity(self) -> int: ...
    def in_flight(self) -> int: ...
    def submit(self, job: TrialJob) -> None: ...
    def wait(self, timeout: float) -> list[Finished]: ...
    def close(self) -> None: ...


def _init_local_worker(threads: int, parent_pid: int) -> None:
    quiet_worker(threads)
    exit_with_parent(parent_pid)


class LocalExecutor:
    """``workers`` processes (spawned: a clean interpreter each, torch limited to ``threads`` threads), kept for
    the whole search, so torch and transformers are imported once per worker, not once per trial."""

    def __init__(self, workers: int, threads: int, max_retries: int):
        self.workers, self.threads, self.max_retries = workers, threads, max_retries
        self.where = f"{workers} local worker{'s' * (workers > 1)} × {threads} thread{'s' * (threads > 1)}"
        self._futures: dict[Future[TrialOutcome], tuple[TrialJob, int]] = {}
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_local_worker,
            initargs=(self.threads, os.getpid()),
        )

    def capacity(self) -> int:
        return self.workers

    def in_flight(self) -> int:
        return len(self._futures)

    def submit(self, job: TrialJob, attempt: int = 0) -> None:
        self._futures[self._pool.submit(run_trial, job)] = (job, attempt)

    def wait(self, timeout: float) -> list[Finished]:
        if not self._futures:
            return []
        done, _ = wait_futures(list(self._futures), timeout=timeout, return_when=FIRST_COMPLETED)
        finished: list[Finished] = []
        broken: list[tuple[TrialJob, int]] = []
        for fut in done:
            job, attempt = self._futures.pop(fut)
            exc = fut.exception()
            if isinstance(exc, BrokenProcessPool):
                broken.append((job, attempt))
            else:
                finished.append((job, exc if exc is not None else fut.result()))
        if broken:
            # A worker died: the pool is unusable and every job in it fails. Rebuild it and run them again.
            self._pool.shutdown(wait=False, cancel_futures=True)
            rest = [(j, a) for j, a in self._futures.values()]
            self._futures.clear()
            self._pool = self._new_pool()
            for job, attempt in [*broken, *rest]:
                if attempt < self.max_retries:
                    self.submit(job, attempt + 1)
                else:
                    finished.append((job, WorkerDied(f"trial {job.number}: its worker died {attempt + 1} times")))
        return finished

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def ray_trial(job: TrialJob, threads: int) -> TrialOutcome:
    """The Ray task: a trial on whichever node Ray picked, merged into that node's temporary folder."""
    quiet_worker(threads)
    return run_trial(job)


class RayExecutor:
    """Each trial is a Ray task needing ``cpus_per_trial`` CPUs (and ``memory_per_trial`` bytes, when given, so
    that Ray never packs more trials on a node than its memory holds). Input models, texts and task files must
    be at the same paths on every node (a shared filesystem, or the same copy everywhere)."""

    def __init__(self, address: str, cpus_per_trial: float, memory_per_trial: int | None, max_retries: int):
        try:
            import ray
        except ImportError:
            raise MergekitliteError("--ray needs Ray: pip install 'mergekitlite[evolve]'") from None
        self._ray = ray
        try:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise MergekitliteError(f"--ray {address}: cannot connect to a Ray cluster ({exc})") from None
        self.cpus = cpus_per_trial
        options: dict[str, Any] = {"num_cpus": cpus_per_trial, "max_retries": max_retries, "retry_exceptions": False}
        if memory_per_trial:
            options["memory"] = memory_per_trial
        self._remote = ray.remote(ray_trial).options(**options)
        self._refs: dict[Any, TrialJob] = {}
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        self.where = f"Ray cluster {address} ({nodes} node{'s' * (nodes > 1)}, {self.capacity()} trials at once)"

    def capacity(self) -> int:
        return max(1, int(self._ray.cluster_resources().get("CPU", 0) // self.cpus))

    def in_flight(self) -> int:
        return len(self._refs)

    def submit(self, job: TrialJob) -> None:
        self._refs[self._remote.remote(job, max(1, int(self.cpus)))] = job

    def wait(self, timeout: float) -> list[Finished]:
        if not self._refs:
            return []
        ready, _ = self._ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        if ready:  # collect everything else that is done too
            ready, _ = self._ray.wait(list(self._refs), num_returns=len(self._refs), timeout=0)
        finished: list[Finished] = []
        for ref in ready:
            job = self._refs.pop(ref)
            try:
                finished.append((job, self._ray.get(ref)))
            except self._ray.exceptions.RayTaskError as exc:  # our code raised: the original exception
                finished.append((job, exc.as_instanceof_cause()))
            except self._ray.exceptions.RayError as exc:  # the worker or its node died more than max_retries times
                finished.append((job, WorkerDied(f"trial {job.number}: {type(exc).__name__}: {exc}")))
        return finished

    def close(self) -> None:
        for ref in self._refs:
            self._ray.cancel(ref, force=True)
        self._ray.shutdown()
