"""The optuna study: its storage, its sampler, and what makes a killed search resume where it stopped.

* **Storage.** An SQL database (by default SQLite in the results folder). Every asked trial, its parameters,
  its result and the sampler's state (CMA-ES keeps its optimizer in the trials' system attributes) are
  committed as they happen, so a killed search loses nothing that finished. Two searches given the same
  storage and study name share the study: each asks and tells trials, and CMA-ES learns from both.
* **Heartbeats.** The search records a heartbeat for each of its running trials every few seconds. A running
  trial whose heartbeat is older than the grace period belongs to a search that died: it is marked failed and
  an identical trial (same parameters) is queued, which the next ask of any search on the study picks up first
  (optuna's ``RetryHeartbeatStaleTrialCallback``). Finished trials are never run again.
* **Sampler.** CMA-ES (optuna's ``CmaEsSampler``, on the ``cmaes`` package) for the numbers. It is a continuous
  method, so a ``choice`` (e.g. the merge method) is not part of its distribution: it goes to the independent
  sampler, TPE, which learns from the scores which options do well (a separate CMA-ES per option would split a
  small budget into smaller ones, and its populations would need filling per option). Parameters that a chosen
  method does not use are still sampled (and ignored by the merge), so CMA-ES always sees the same space.
  CMA-ES starts from the middle of the bounds with σ = (high − low)/6; the baseline (the template's ``init``
  values) is the first trial, so the hand-made recipe is scored and on the leaderboard.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mergekitlite.errors import MergekitliteError
from mergekitlite.evolve.space import SearchSpace
from mergekitlite.evolve.spec import Optimizer

SPACE_ATTR = "mergekitlite.space"
OBJECTIVE_ATTR = "mergekitlite.objective"
ROLE_ATTR = "role"  # user attribute of a trial: "baseline" for the template's init values
GRACE_HEARTBEATS = 3  # a running trial is stale after this many heartbeat intervals without one


def make_sampler(optimizer: Optimizer, seed: int) -> Any:
    import optuna

    if optimizer.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    tpe = optuna.samplers.TPESampler(seed=seed)
    if optimizer.sampler == "tpe":
        return tpe
    return optuna.samplers.CmaEsSampler(
        seed=seed, popsize=optimizer.popsize, independent_sampler=tpe, warn_independent_sampling=False
    )


def make_storage(url: str, heartbeat: int, attempts: int = 5) -> Any:
    import optuna
    import sqlalchemy.exc
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    for attempt in range(attempts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return RDBStorage(
                    url,
                    # SQLite allows one writer at a time: a second search on the study waits its turn.
                    engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
                    heartbeat_interval=heartbeat,
                    grace_period=GRACE_HEARTBEATS * heartbeat,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
                )
            except sqlalchemy.exc.IntegrityError:
                # Two searches creating the same new database at once: one wins the schema, the other retries.
                time.sleep(0.5 * (attempt + 1))
            except Exception as exc:  # sqlalchemy's errors for a bad URL, an unwritable file, ...
                raise MergekitliteError(f"--storage {url}: cannot open the study database ({exc})") from None
    raise MergekitliteError(f"--storage {url}: the database schema could not be created ({attempts} attempts)")


@dataclass(frozen=True)
class Fingerprints:
    space: str
    objective: str


def open_study(
    storage: Any, name: str, space: SearchSpace, fingerprints: Fingerprints, optimizer: Optimizer, seed: int
) -> Any:
    """Create the study (with the baseline queued as its first trial) or load it, checking that it was made for
    the same space and objective."""
    import optuna

    study = optuna.create_study(
        storage=storage,
        study_name=name,
        sampler=make_sampler(optimizer, seed),
        direction="maximize",
        load_if_exists=True,
    )
    attrs = study.user_attrs
    if SPACE_ATTR not in attrs:
        study.set_user_attr(SPACE_ATTR, fingerprints.space)
        study.set_user_attr(OBJECTIVE_ATTR, fingerprints.objective)
        # skip_if_exists: two searches creating the study at once queue one baseline, not two.
        study.enqueue_trial(space.baseline(), user_attrs={ROLE_ATTR: "baseline"}, skip_if_exists=True)
        return study
    for key, mine, what in (
        (SPACE_ATTR, fingerprints.space, "free parameters"),
        (OBJECTIVE_ATTR, fingerprints.objective, "objective"),
    ):
        if attrs.get(key) != mine:
            raise MergekitliteError(
                f"study {name!r} in {storage.url if hasattr(storage, 'url') else storage} was made for other "
                f"{what}: its trials cannot be compared with these. Give another --study-name (or --output), or "
                "undo the change to the spec"
            )
    return study


def fail_stale(study: Any) -> None:
    """Running trials of searches that died: failed, and queued again with the same parameters."""
    import optuna
    from optuna.storages import fail_stale_trials

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)


def ask(study: Any) -> Any:
    """A new trial (a queued one first: the baseline, or the retry of a dead search's trial), its heartbeat
    recorded at once so that it is never left running without one."""
    with warnings.catch_warnings():
        # optuna warns that heartbeats are meant for Study.optimize: we keep them ourselves (see search.drive).
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)
    return trial


def requeue(study: Any, trials: Iterable[Any]) -> None:
    """Trials this search will not finish (it was interrupted): failed, and queued again with the same
    parameters at once, so the next run starts with them (no waiting for their heartbeats to go stale)."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback()
        for trial in trials:
            retry(study, study.tell(trial, state=TrialState.FAIL, skip_if_finished=True))


def counts(study: Any) -> dict[str, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
    out = {"complete": 0, "running": 0, "waiting": 0}
    for t in trials:
        out[t.state.name.lower()] += 1
    return out


def best_value(study: Any) -> float | None:
    try:
        return float(study.best_value)
    except ValueError:  # no finished trial yet
        return None


def baseline_trial(study: Any) -> Any | None:
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get(ROLE_ATTR) == "baseline":
            return t
    return None
