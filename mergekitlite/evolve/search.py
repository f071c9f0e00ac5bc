"""The search loop: ask the study for trials, run them where the executor runs them, tell the study their scores.

Trials are asked only while a worker is free and the budget allows (finished + running trials of the whole
study, so that searches sharing a study do not overshoot it together), then run in parallel; each result is
told as soon as it comes back. The loop also keeps the heartbeats of its running trials and fails the stale
trials of dead searches (which queues them again), so a killed search resumes by running the same command.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mergekitlite.api import MergeOptions
from mergekitlite.errors import MergekitliteError
from mergekitlite.evaluate import LoadOptions
from mergekitlite.evolve import study as studies
from mergekitlite.evolve.executors import Executor, LocalExecutor, RayExecutor, WorkerDied
from mergekitlite.evolve.prepare import Resolved, Workers, objective_fingerprint, plan_workers, resolve
from mergekitlite.evolve.space import SearchSpace, recipe_yaml
from mergekitlite.evolve.spec import LoadedSearch, Term
from mergekitlite.evolve.trial import TrialJob, TrialOutcome

VALUE_ATTR = "value:"  # user attribute prefix of a trial's metric values
HOLDOUT_ATTR = "holdout:"  # study attribute prefix: held-out results of a trial, by its number


@dataclass(frozen=True)
class SearchOptions:
    output: Path | None = None  # results folder (default: the spec's output, else evolve/<name>)
    storage: str | None = None  # SQLAlchemy URL (default: SQLite file study.db in the results folder)
    study_name: str | None = None  # default: the spec's name
    trials: int | None = None  # overrides budget.trials
    wall_time: float | None = None  # seconds; overrides budget.wall_time
    jobs: int | None = None  # local workers at most (default: as many as cores and --max-ram allow)
    max_ram: int | None = None  # local: all workers together; Ray: per trial
    ray: str | None = None  # Ray address ("auto" or host:port): trials run as Ray tasks
    ray_cpus_per_trial: float = 1.0
    max_retries: int = 2  # runs of a trial whose worker died, after the first
    device: str = "cpu"  # where trials merge and measure
    work_dir: Path | None = None  # where trials merge (default: the system's temporary folder, node-local)
    heartbeat: int = 10  # seconds between heartbeats of running trials
    seed: int | None = None  # overrides the spec's seed


class SearchProgress(Protocol):
    def start(self, total: int | None, done: int, best: float | None) -> None: ...
    def update(self, done: int, best: float | None) -> None: ...
    def note(self, message: str) -> None: ...
    def stop(self) -> None: ...


class NullSearchProgress:
    def start(self, total: int | None, done: int, best: float | None) -> None:
        pass

    def update(self, done: int, best: float | None) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass
class Search:
    """One run of a spec: everything the loop and the reports need."""

    loaded: LoadedSearch
    options: SearchOptions
    space: SearchSpace
    resolved: Resolved
    output: Path
    storage_url: str
    study_name: str
    workers: Workers
    study: Any = None
    executor: Executor | None = None
    new_trials: int = 0
    holdout: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def total(self) -> int | None:
        return self.options.trials or self.loaded.spec.budget.trials

    @property
    def wall_time(self) -> float | None:
        return self.options.wall_time or self.loaded.spec.budget.seconds

    @property
    def seed(self) -> int:
        return self.options.seed if self.options.seed is not None else self.loaded.spec.seed


def prepare_search(loaded: LoadedSearch, options: SearchOptions) -> Search:
    """Resolve models and files, decide where results go and how many workers run; opens nothing yet."""
    space = SearchSpace(loaded)
    resolved = resolve(loaded, space)
    spec = loaded.spec
    output = options.output or Path(spec.output or Path("evolve") / spec.name)
    storage = options.storage or f"sqlite:///{(output / 'study.db').resolve()}"
    workers = plan_workers(resolved.largest_model_bytes, None if options.ray else options.max_ram, options.jobs)
    return Search(loaded, options, space, resolved, output, storage, options.study_name or spec.name, workers)


def job(search: Search, number: int, params: dict[str, Any], terms: tuple[Term, ...]) -> TrialJob:
    data = search.space.recipe_data(params, search.resolved.models)
    w = search.workers
    ray = search.options.ray is not None
    merge = MergeOptions(
        device=search.options.device,
        max_ram=search.options.max_ram if ray else w.merge_ram,
        threads=max(1, int(search.options.ray_cpus_per_trial)) if ray else w.threads,
        hash_inputs=False,  # a temporary merge needs no card hashes (and workers would race on the hash cache)
        overwrite=True,
    )
    load = LoadOptions(device=search.options.device, max_ram=None if ray else w.eval_ram)
    work_dir = str(search.options.work_dir) if search.options.work_dir else None
    return TrialJob(
        number, recipe_yaml(data, f"trial {number} of study {search.study_name}"), terms, merge, load, work_dir
    )


def make_executor(search: Search) -> Executor:
    o = search.options
    if o.ray is not None:
        return RayExecutor(o.ray, o.ray_cpus_per_trial, o.max_ram, o.max_retries)
    return LocalExecutor(search.workers.count, search.workers.threads, o.max_retries)


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """optuna logs every trial at INFO; the progress bar and the leaderboard say it better (restored after)."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def _record(search: Search, trial: Any, outcome: TrialOutcome | BaseException, progress: SearchProgress) -> bool:
    """Tell the study how a trial went; False if it failed. Raises what is a bug (not a MergekitliteError)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    study = search.study
    try:
        if isinstance(outcome, BaseException):
            trial.set_user_attr("error", f"{type(outcome).__name__}: {outcome}")
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            if not isinstance(outcome, MergekitliteError):
                raise outcome
            progress.note(f"trial {trial.number} failed: {outcome}")
            return False
        for r in outcome.results:
            trial.set_user_attr(VALUE_ATTR + r.name, r.value)
        trial.set_user_attr("merge_seconds", round(outcome.merge_seconds, 3))
        trial.set_user_attr("eval_seconds", round(outcome.eval_seconds, 3))
        trial.set_user_attr("worker", outcome.host)
        trial.set_user_attr("worker_peak_rss", outcome.peak_rss)
        if outcome.error is not None or not math.isfinite(outcome.score):
            error = outcome.error or f"the score is not a finite number ({outcome.score})"
            trial.set_user_attr("error", error)
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            progress.note(f"trial {trial.number} failed: {error}")
            return False
        study.tell(trial, outcome.score, skip_if_finished=True)
        return True
    except UpdateFinishedTrialError:
        # Another search declared this trial dead (its heartbeat was late) and queued it again: that retry
        # counts, this result does not.
        progress.note(f"trial {trial.number} was taken over by another search; its result is dropped")
        return True


def drive(search: Search, progress: SearchProgress) -> None:
    """Run trials until the budget is spent; returns when every trial this run started has been told."""
    from optuna.exceptions import UpdateFinishedTrialError

    study, executor, storage = search.study, search.executor, search.study._storage
    assert executor is not None
    started = time.monotonic()
    deadline = started + search.wall_time if search.wall_time else None
    pending: dict[int, Any] = {}  # trial number → optuna Trial
    failures_in_a_row = 0
    wait = max(0.2, search.options.heartbeat / 2)
    c = studies.counts(study)
    progress.start(search.total, c["complete"], studies.best_value(study))
    try:
        while True:
            studies.fail_stale(study)
            c = studies.counts(study)
            time_left = deadline is None or time.monotonic() < deadline
            room = search.total is None or c["complete"] + c["running"] < search.total
            while time_left and room and executor.in_flight() < executor.capacity():
                trial = studies.ask(study)
                try:
                    params = search.space.suggest(trial)
                except UpdateFinishedTrialError:
                    # Another search sharing the study took it over between ask and suggest (a late heartbeat).
                    progress.note(f"trial {trial.number} was taken over by another search")
                    continue
                executor.submit(job(search, trial.number, params, search.resolved.terms))
                pending[trial.number] = trial
                search.new_trials += 1
                c["running"] += 1
                room = search.total is None or c["complete"] + c["running"] < search.total
            if not pending:
                # Out of time: done. Budget spent: done once the study's last trials (another search's, sharing
                # the study) have finished, so that the reports show them; if one goes stale it is queued again,
                # and there is room for this search to run it.
                if not time_left or (not room and c["running"] == 0):
                    return
                time.sleep(wait)
                continue
            for finished_job, outcome in executor.wait(wait):
                ok = _record(search, pending.pop(finished_job.number), outcome, progress)
                failures_in_a_row = 0 if ok else failures_in_a_row + 1
                if failures_in_a_row >= max(3, executor.capacity()):
                    raise MergekitliteError(f"{failures_in_a_row} trials in a row failed; the last: {_error(outcome)}")
            for trial in pending.values():
                storage.record_heartbeat(trial._trial_id)
            progress.update(studies.counts(study)["complete"], studies.best_value(study))
    except BaseException:
        studies.requeue(search.study, pending.values())
        raise


def _error(outcome: TrialOutcome | BaseException) -> str:
    return str(outcome) if isinstance(outcome, BaseException) else str(outcome.error)


def measure_holdout(search: Search, trials: list[Any], progress: SearchProgress) -> None:
    """The held-out terms of the given trials (each measured once per study: kept in the study's attributes)."""
    executor = search.executor
    assert executor is not None
    # Keyed by the held-out terms' fingerprint too: a study resumed with other held-out terms measures again.
    key = f"{HOLDOUT_ATTR}{objective_fingerprint(search.resolved.holdout)}:"
    todo = [t for t in trials if key + str(t.number) not in search.study.user_attrs]
    for t in todo:
        executor.submit(job(search, t.number, t.params, search.resolved.holdout))
    if todo:
        progress.note(
            f"measuring the held-out metrics of trial{'s' * (len(todo) > 1)} {', '.join(str(t.number) for t in todo)}"
        )
    while executor.in_flight():
        for finished_job, outcome in executor.wait(1.0):
            if isinstance(outcome, WorkerDied) or (isinstance(outcome, TrialOutcome) and outcome.error):
                raise MergekitliteError(f"held-out measurement of trial {finished_job.number}: {_error(outcome)}")
            if isinstance(outcome, BaseException):
                raise outcome
            values = {r.name: r.value for r in outcome.results}
            search.study.set_user_attr(key + str(finished_job.number), {"score": outcome.score, **values})
    attrs = search.study.user_attrs
    search.holdout = {t.number: attrs[key + str(t.number)] for t in trials}


def run_search(loaded: LoadedSearch, options: SearchOptions, progress: SearchProgress | None = None) -> Search:
    """The whole search: open (or resume) the study, run the budget's trials, measure the held-out terms of the
    best trial and the baseline. Reports are written by ``report.write_reports``."""
    progress = progress or NullSearchProgress()
    search = prepare_search(loaded, options)
    search.output.mkdir(parents=True, exist_ok=True)
    fingerprints = studies.Fingerprints(search.space.fingerprint(), objective_fingerprint(search.resolved.terms))
    with quiet_optuna():
        storage = studies.make_storage(search.storage_url, options.heartbeat)
        search.study = studies.open_study(
            storage, search.study_name, search.space, fingerprints, loaded.spec.optimizer, search.seed
        )
        search.executor = make_executor(search)
        progress.note(f"study {search.study_name!r} in {search.storage_url}; trials run on {search.executor.where}")
        try:
            drive(search, progress)
            progress.stop()
            if studies.best_value(search.study) is None:
                raise MergekitliteError(f"study {search.study_name!r} has no finished trial: nothing to report")
            chosen = [search.study.best_trial]
            base = studies.baseline_trial(search.study)
            if base is not None and base.number != chosen[0].number:
                chosen.append(base)
            if search.resolved.holdout:
                measure_holdout(search, chosen, progress)
        finally:
            progress.stop()
            search.executor.close()
    return search
