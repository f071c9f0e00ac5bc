"""One trial: merge a recipe into a temporary folder, measure it, delete it.

``run_trial`` is a plain function of picklable values, so that it runs the same in this process, in a local
worker process, or as a Ray task on another node (where the temporary folder is on that node's disk). It never
imports optuna: trials know nothing of the study.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mergekitlite.api import MergeOptions, peak_rss_bytes, run_merge
from mergekitlite.errors import MergekitliteError
from mergekitlite.evaluate import LoadOptions
from mergekitlite.evolve.metrics import TermResult, evaluate_terms, total_score
from mergekitlite.evolve.spec import Term
from mergekitlite.recipe import parse_recipe


@dataclass(frozen=True)
class TrialJob:
    number: int  # the optuna trial number (or -1 for a recipe measured outside the study)
    recipe_text: str  # model folders absolute: the job may run in another working directory or node
    terms: tuple[Term, ...]  # file names absolute, for the same reason
    merge: MergeOptions = field(default_factory=MergeOptions)
    load: LoadOptions = field(default_factory=LoadOptions)
    work_dir: str | None = None  # where the merged folder goes; None: the system's temporary folder


@dataclass(frozen=True)
class TrialOutcome:
    number: int
    results: tuple[TermResult, ...] = ()
    score: float = float("nan")
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    peak_rss: int = 0  # the running process's peak so far (a worker's covers every trial it ran)
    host: str = ""
    error: str | None = None  # a problem of the recipe or the models (MergekitliteError): the trial failed

    @property
    def ok(self) -> bool:
        return self.error is None


def run_trial(job: TrialJob) -> TrialOutcome:
    """Merge ``job.recipe_text`` and measure ``job.terms``. Problems of the recipe or the models come back as
    a failed outcome; anything else (a bug) is raised."""
    host = f"{socket.gethostname()}:{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix=f"mkl-trial-{job.number}-", dir=job.work_dir) as tmp:
        out = Path(tmp) / "merged"
        started = time.perf_counter()
        try:
            loaded = parse_recipe(job.recipe_text, source=f"trial {job.number}")
            run_merge(loaded, out, job.merge)
            merged = time.perf_counter()
            results = tuple(evaluate_terms(out, job.terms, job.load))
        except MergekitliteError as exc:
            return TrialOutcome(job.number, peak_rss=peak_rss_bytes(), host=host, error=str(exc))
    done = time.perf_counter()
    return TrialOutcome(
        job.number,
        results,
        total_score(results),
        merge_seconds=merged - started,
        eval_seconds=done - merged,
        peak_rss=peak_rss_bytes(),
        host=host,
    )


def quiet_worker(threads: int | None) -> None:
    """Settings of a process that only runs trials: torch threads, and no library progress bars or notes
    (they would scribble over the search's progress bar)."""
    import torch
    from transformers.utils import logging as hf_logging

    if threads:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def exit_with_parent(parent_pid: int, period: float = 1.0) -> None:
    """End this worker process when the search that started it is gone (killed with SIGKILL, say): an
    orphaned worker would keep merging for nobody."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(period)
        os._exit(1)

    threading.Thread(target=watch, name="mkl-parent-watch", daemon=True).start()
