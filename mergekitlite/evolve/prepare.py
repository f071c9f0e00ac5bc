"""Before the first trial: every model and file the spec names resolved to an absolute path (so a trial runs the
same in any working directory or on any node), and how much memory one trial needs.

Memory of a trial: the merge streams within its own budget (``MergeOptions.max_ram``), then the merged model is
loaded once for measuring (lm-eval loads it again, after ours is freed). A worker's peak is therefore about
``TRIAL_BASELINE_RSS`` (the interpreter with torch and transformers) + twice the largest model (loading may hold
the checkpoint and the model at once), and the search runs as many workers as ``--max-ram`` holds, at most one
per core. When even one does not fit, that one measures with accelerate's disk offload inside the budget.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mergekitlite.budget import available_ram
from mergekitlite.errors import MergekitliteError, RecipeError
from mergekitlite.evolve.space import SearchSpace
from mergekitlite.evolve.spec import TERM_FILE_KEYS, KlTerm, LoadedSearch, Term, resolve_file
from mergekitlite.recipe import PositionedProblems, Recipe, path_of_model
from mergekitlite.sources import index_model, resolve_model_path

# What a trial costs besides its model: the peak RSS of one trial run alone on the 0.2M-parameter demo family was
# 0.43 GB (interpreter, torch, transformers, tokenizer; bench/evolve_bench.py), rounded up.
TRIAL_BASELINE_RSS = 500 * 1000**2
DEFAULT_RAM_SHARE = 0.5  # of the available memory, for all workers together, without --max-ram


@dataclass(frozen=True)
class Resolved:
    models: dict[str, str]  # reference as written → absolute folder (local models only; hub ids stay as they are)
    terms: tuple[Term, ...]  # file names absolute
    holdout: tuple[Term, ...]
    largest_model_bytes: int


def _template_models(space: SearchSpace) -> dict[str, tuple[str | int, ...]]:
    """Every model the template names (for any value of its free parameters: model references are never free),
    with where it is written."""
    recipe = Recipe.model_validate(space.recipe_data(space.baseline()))
    return {ref: ("template", *path_of_model(recipe, ref)) for ref in recipe.referenced_models()}


def _absolute_terms(terms: list[Term], base_dir: Path, models: dict[str, str]) -> tuple[Term, ...]:
    out = []
    for term in terms:
        update = {k: str(resolve_file(v, base_dir)) for k in TERM_FILE_KEYS if (v := getattr(term, k, None))}
        if isinstance(term, KlTerm):
            update["parent"] = models.get(term.parent, term.parent)
        out.append(term.model_copy(update=update))
    return tuple(out)


def resolve(loaded: LoadedSearch, space: SearchSpace) -> Resolved:
    """Resolve every model (template and KL parents) and file; every problem at once, at its position."""
    problems = PositionedProblems(str(loaded.path or "<search>"), loaded.positions)
    refs = _template_models(space)
    for key in ("objective", "holdout"):
        for i, term in enumerate(getattr(loaded.spec, key)):
            if isinstance(term, KlTerm):
                refs.setdefault(term.parent, (key, i, "parent"))
    models: dict[str, str] = {}
    largest = 0
    for ref, where in refs.items():
        try:
            path, hub = resolve_model_path(ref, loaded.base_dir)
            source = index_model(ref, path, hub)
        except MergekitliteError as exc:
            problems.add(where, str(exc))
            continue
        if not hub:
            models[ref] = str(path)
        largest = max(largest, sum(t.nbytes for t in source.tensors.values()))
    if problems.items:
        raise RecipeError(problems.lines())
    spec = loaded.spec
    return Resolved(
        models,
        _absolute_terms(spec.objective, loaded.base_dir, models),
        _absolute_terms(spec.holdout, loaded.base_dir, models),
        largest,
    )


def objective_fingerprint(terms: tuple[Term, ...]) -> str:
    """Identifies the objective (metrics, files, weights): a study's scores are comparable only under one."""
    described = [t.model_dump(mode="json") for t in terms]
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Workers:
    count: int
    threads: int  # torch threads of each
    merge_ram: int  # --max-ram of each trial's merge
    eval_ram: int | None  # accelerate's RAM limit for measuring; None: the model fits, no offload


def plan_workers(largest_model_bytes: int, max_ram: int | None, jobs: int | None, cores: int | None = None) -> Workers:
    cores = cores or os.cpu_count() or 1
    budget = max_ram if max_ram is not None else int(available_ram() * DEFAULT_RAM_SHARE)
    need = TRIAL_BASELINE_RSS + 2 * largest_model_bytes
    count = max(1, min(cores, jobs or cores, budget // need))
    share = budget // count
    eval_ram = None if share >= need else max(share - TRIAL_BASELINE_RSS, 1)
    return Workers(count, max(1, cores // count), share, eval_ram)
