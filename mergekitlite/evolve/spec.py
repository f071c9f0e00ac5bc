"""The search spec: a recipe template with free parameters, an objective, a budget, a seed.

A spec is YAML, validated like a recipe: every problem at once, each as ``file:line:col: key.path: message``
(positions from ``mergekitlite.yamlpos``, lines rendered by the recipe loader's problem collector). The
template is checked by the recipe loader itself, once per merge method it may choose, with each free
parameter replaced by a representative value, so a typo in the template is reported where it is written.

A free parameter is a mapping with a ``search`` key, written where the recipe has a value::

    weight: {search: float, low: 0.0, high: 2.0, init: 1.0}
    weight: {search: gradient, points: 3, low: 0.0, high: 2.0, init: 1.0}   # a gradient of 3 searched points
    merge_method: {search: choice, options: [task_arithmetic, ties]}
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from mergekitlite.errors import RecipeError
from mergekitlite.recipe import PositionedProblems, format_path, validate_document
from mergekitlite.yamlpos import PositionedYaml, YamlSyntaxError, load_positioned

YamlPath = tuple[str | int, ...]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------------------ free parameters


class _Bounded(Strict):
    low: StrictInt | StrictFloat
    high: StrictInt | StrictFloat
    name: str | None = Field(None, description="Name in the study and the leaderboard (default: the key path).")

    @model_validator(mode="after")
    def _order(self) -> _Bounded:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class FloatParam(_Bounded):
    """A real number in [low, high]."""

    search: Literal["float"]
    log: bool = Field(False, description="Search on a log scale (low must be > 0).")
    init: StrictInt | StrictFloat | None = Field(None, description="Value of the baseline trial (default: the middle).")

    @model_validator(mode="after")
    def _init(self) -> FloatParam:
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.init is not None and not self.low <= self.init <= self.high:
            raise ValueError(f"init {self.init} is outside [{self.low}, {self.high}]")
        return self


class IntParam(_Bounded):
    """An integer in [low, high]."""

    search: Literal["int"]
    low: StrictInt
    high: StrictInt
    init: StrictInt | None = None

    @model_validator(mode="after")
    def _init(self) -> IntParam:
        if self.init is not None and not self.low <= self.init <= self.high:
            raise ValueError(f"init {self.init} is outside [{self.low}, {self.high}]")
        return self


class GradientParam(_Bounded):
    """A gradient over the layers (the recipe's list of numbers, interpolated linearly) of ``points``
    searched values, each in [low, high]."""

    search: Literal["gradient"]
    points: int = Field(ge=2, le=64, description="How many values the gradient has (each one a searched number).")
    init: StrictInt | StrictFloat | list[StrictInt | StrictFloat] | None = Field(
        None, description="Baseline: one value for every point, or a list of `points` values."
    )

    @model_validator(mode="after")
    def _init(self) -> GradientParam:
        values = self.init_values()
        if values is not None:
            if len(values) != self.points:
                raise ValueError(f"init has {len(values)} values but points is {self.points}")
            outside = [v for v in values if not self.low <= v <= self.high]
            if outside:
                raise ValueError(f"init {outside[0]} is outside [{self.low}, {self.high}]")
        return self

    def init_values(self) -> list[float] | None:
        if self.init is None:
            return None
        return list(self.init) if isinstance(self.init, list) else [self.init] * self.points


ChoiceValue = Union[StrictBool, StrictInt, StrictFloat, StrictStr]


class ChoiceParam(Strict):
    """One of ``options`` (e.g. a merge method). CMA-ES is continuous: choices are sampled by TPE."""

    search: Literal["choice"]
    options: list[ChoiceValue] = Field(min_length=2)
    init: ChoiceValue | None = Field(None, description="Value of the baseline trial (default: the first option).")
    name: str | None = None

    @model_validator(mode="after")
    def _init(self) -> ChoiceParam:
        if len(set(map(repr, self.options))) != len(self.options):
            raise ValueError("options must be distinct")
        if self.init is not None and self.init not in self.options:
            raise ValueError(f"init {self.init!r} is not one of the options")
        return self


def _by_tag(key: str, *models: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Discriminator value → model, read from each model's Literal field (for 'did you mean' hints)."""
    return {get_args(m.model_fields[key].annotation)[0]: m for m in models}


Marker = Annotated[Union[FloatParam, IntParam, GradientParam, ChoiceParam], Field(discriminator="search")]
MARKER = TypeAdapter(Marker)
MARKER_MODELS = _by_tag("search", FloatParam, IntParam, GradientParam, ChoiceParam)


# ------------------------------------------------------------------------------------------ objective


class _Term(Strict):
    weight: float = Field(1.0, gt=0, description="Importance of this term in the score (a weighted sum).")
    name: str | None = Field(None, description="Column name in the leaderboard (default: metric:file stem).")

    def default_name(self) -> str:
        raise NotImplementedError

    @property
    def label(self) -> str:
        return self.name or self.default_name()


class PerplexityTerm(_Term):
    """Perplexity of a text file (sliding windows, as `mergekitlite eval`); enters the score as −log(ppl)."""

    metric: Literal["perplexity"]
    text: str = Field(description="UTF-8 text file (relative to the working directory, then to the spec).")
    max_tokens: int | None = Field(None, ge=2, description="Score only the first N tokens (faster trials).")
    max_length: int | None = Field(None, ge=2, description="Window length (default: the model's context, ≤ 2048).")
    stride: int | None = Field(None, ge=1, description="Distance between window ends (default: half a window).")

    def default_name(self) -> str:
        return f"perplexity:{Path(self.text).stem}"


class EosTerm(_Term):
    """Share of prompts whose greedy answer ends with one of the model's stop ids (`mergekitlite eval`)."""

    metric: Literal["eos_rate"]
    prompts: str | None = Field(None, description="YAML list of {prompt, reference} (default: the built-in set).")
    max_prompts: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(64, ge=1)

    def default_name(self) -> str:
        return f"eos_rate:{Path(self.prompts).stem}" if self.prompts else "eos_rate"


class KlTerm(_Term):
    """KL(merged ‖ parent) in nats per token over the first `tokens` positions of a text; enters as −KL."""

    metric: Literal["kl"]
    parent: str = Field(description="The model to stay close to (folder or hub id).")
    text: str
    tokens: int = Field(512, ge=1)
    max_length: int | None = Field(None, ge=2)
    stride: int | None = Field(None, ge=1)

    def default_name(self) -> str:
        return f"kl:{Path(self.parent).name}"


class QaTerm(_Term):
    """A JSONL question/answer task: accuracy of greedy answers, or perplexity of the reference answers
    (each question rendered with the merged model's chat template)."""

    metric: Literal["qa"]
    path: str = Field(description='JSONL, one {"question": ..., "answer": ..., "aliases": [...]} per line.')
    score: Literal["accuracy", "answer_perplexity"] = Field(
        "accuracy",
        description="accuracy: share of greedy answers that match; answer_perplexity: perplexity of the reference "
        "answers plus the end-of-turn token, teacher-forced (continuous: better for small models and searches); "
        "enters the score as −log.",
    )
    match: Literal["exact", "contains"] = Field(
        "contains",
        description="exact: the answer equals the reference (or an alias); contains: the reference (or an alias) "
        "occurs in the answer. Both compare case-folded text with runs of whitespace collapsed.",
    )
    max_new_tokens: int = Field(64, ge=1)
    limit: int | None = Field(None, ge=1, description="Use only the first N questions.")

    def default_name(self) -> str:
        kind = "accuracy" if self.score == "accuracy" else "answer_ppl"
        return f"{kind}:{Path(self.path).stem}"


class LmEvalTerm(_Term):
    """A task of lm-eval (EleutherAI's harness), run on the merged folder through its Python API (`hf` model)."""

    metric: Literal["lm_eval"]
    task: str = Field(description="lm-eval task name, e.g. arc_easy, or one defined under include_path.")
    include_path: str | None = Field(
        None, description="Folder of custom lm-eval task YAML files (then only they are indexed, not the built-ins)."
    )
    result: str = Field("acc,none", description="Which number of the task's results: lm-eval's 'metric,filter' key.")
    limit: int | float | None = Field(None, gt=0, description="Examples per task (a fraction when < 1).")
    num_fewshot: int | None = Field(None, ge=0)
    apply_chat_template: bool = True
    batch_size: int = Field(1, ge=1)

    def default_name(self) -> str:
        return f"lm_eval:{self.task}"


Term = Annotated[Union[PerplexityTerm, EosTerm, KlTerm, QaTerm, LmEvalTerm], Field(discriminator="metric")]
TERM = TypeAdapter(Term)
TERM_MODELS = _by_tag("metric", PerplexityTerm, EosTerm, KlTerm, QaTerm, LmEvalTerm)
# Keys of terms that name files or folders: resolved like model folders (working directory, then the spec's folder).
TERM_FILE_KEYS = ("text", "prompts", "path", "include_path")


# ------------------------------------------------------------------------------------------ the spec

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: float | str) -> float:
    """90, '90s', '10m', '1.5h' → seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r} (expected seconds, or e.g. 90s, 10m, 2h)")
    return float(m[1]) * _UNIT_SECONDS[m[2] or "s"]


class Budget(Strict):
    trials: int | None = Field(None, ge=1, description="Finished trials the study should have (over all runs).")
    wall_time: StrictInt | StrictFloat | StrictStr | None = Field(
        None, description="Time this run may start trials for: seconds, or e.g. 90s, 10m, 2h."
    )

    @field_validator("wall_time")
    @classmethod
    def _duration(cls, v: float | str | None) -> float | str | None:
        if v is not None:
            parse_duration(v)
        return v

    @model_validator(mode="after")
    def _some(self) -> Budget:
        if self.trials is None and self.wall_time is None:
            raise ValueError("give trials, wall_time or both")
        return self

    @property
    def seconds(self) -> float | None:
        return None if self.wall_time is None else parse_duration(self.wall_time)


class Optimizer(Strict):
    sampler: Literal["cmaes", "tpe", "random"] = Field(
        "cmaes",
        description="cmaes: optuna's CMA-ES for numbers, TPE for choices (default); tpe; random (a baseline).",
    )
    popsize: int | None = Field(None, ge=2, description="CMA-ES population (default 4 + 3·ln(dimensions)).")


class SearchSpec(Strict):
    """What `mergekitlite evolve` searches: see the README section 'Searching for the recipe'."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Study name and default output folder.")
    template: dict[str, Any] = Field(
        description="A recipe (mergekit format, schemas/recipe.schema.json) whose values may be free parameters: "
        "{search: float|int|gradient|choice, ...}."
    )
    objective: list[Term] = Field(min_length=1, description="Maximised: Σ weight × goodness of each metric.")
    holdout: list[Term] = Field(
        default_factory=list,
        description="Metrics measured on the best and the baseline recipe after the search, never optimised.",
    )
    budget: Budget
    seed: int = Field(0, description="Seed of the sampler.")
    optimizer: Optimizer = Optimizer()
    output: str | None = Field(None, description="Results folder (default: evolve/<name>).")


# ------------------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class FoundMarker:
    path: YamlPath  # inside the template
    marker: FloatParam | IntParam | GradientParam | ChoiceParam


@dataclass(frozen=True)
class LoadedSearch:
    spec: SearchSpec
    markers: tuple[FoundMarker, ...]
    text: str
    path: Path | None
    positions: PositionedYaml

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()


def find_markers(node: Any, path: YamlPath = ()) -> Iterator[tuple[YamlPath, Any]]:
    """Every mapping with a ``search`` key in the template, depth first, in file order."""
    if isinstance(node, dict):
        if "search" in node:
            yield path, node
            return
        for key, value in node.items():
            yield from find_markers(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from find_markers(value, (*path, i))


def _model_for(loc: YamlPath, data: Any) -> type[BaseModel] | None:
    """The Pydantic model of the mapping at ``loc`` of the spec (for 'did you mean' hints)."""
    names = [p for p in loc if isinstance(p, str)]
    if not names:
        return SearchSpec
    if names[0] in ("objective", "holdout"):
        return TERM_MODELS.get(names[-1]) if len(names) == 2 else None
    return {"budget": Budget, "optimizer": Optimizer}.get(names[0]) if len(names) == 1 else None


def add_validation_errors(
    exc: ValidationError, problems: PositionedProblems, prefix: YamlPath, model_for: Any, tags: set[str]
) -> None:
    """Pydantic's errors as problems at their position; discriminator tags (not in the file) are dropped."""
    import difflib

    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in tags))
        path = (*prefix, *loc)
        if err["type"] == "extra_forbidden":
            model = model_for(err["loc"][:-1])
            known = list(model.model_fields) if model else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = (
                f" (did you mean {close[0]!r}?)" if close else (f"; expected one of: {', '.join(known)}" * bool(known))
            )
            problems.add(path, f"unknown key{hint}", key=True)
        elif err["type"] == "missing":
            problems.add(path, "required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = f"; got {got!r}" if not isinstance(got, dict | list) and repr(got) not in msg else ""
            problems.add(path, f"{msg[0].lower()}{msg[1:]}{shown}")


def _check_markers(template: Any, problems: PositionedProblems) -> list[FoundMarker]:
    found = []
    for path, raw in find_markers(template):
        where = ("template", *path)
        try:
            found.append(FoundMarker(path, MARKER.validate_python(raw)))
        except ValidationError as exc:
            tag = raw.get("search")
            add_validation_errors(
                exc, problems, where, lambda loc, t=tag: MARKER_MODELS.get(str(t)), set(MARKER_MODELS)
            )
    return found


def _valid_terms(data: dict[str, Any]) -> list[tuple[YamlPath, Term]]:
    """The terms of objective and holdout that validate (each on its own, so that the checks below run even
    when other parts of the spec are wrong: every problem is reported at once)."""
    out = []
    for key in ("objective", "holdout"):
        raw = data.get(key)
        for i, item in enumerate(raw if isinstance(raw, list) else []):
            with contextlib.suppress(ValidationError):  # reported by the validation of the whole spec
                out.append(((key, i), TERM.validate_python(item)))
    return out


def _check_names(markers: list[FoundMarker], terms: list[tuple[YamlPath, Term]], problems: PositionedProblems) -> None:
    seen: dict[str, YamlPath] = {}
    for m in markers:
        name = m.marker.name or format_path(m.path)
        if name in seen:
            problems.add(
                ("template", *m.path), f"parameter name {name!r} is used twice (also at {format_path(seen[name])})"
            )
        seen.setdefault(name, m.path)
    labels: dict[tuple[str | int, str], YamlPath] = {}
    for where, term in terms:
        if (where[0], term.label) in labels:
            problems.add(where, f"two terms are named {term.label!r}: give one a distinct 'name'")
        labels.setdefault((where[0], term.label), where)


def representative(marker: FloatParam | IntParam | GradientParam | ChoiceParam, choice: Any = None) -> Any:
    """A value standing for the marker when the template is validated (and the baseline trial's value)."""
    if isinstance(marker, ChoiceParam):
        return choice if choice is not None else (marker.init if marker.init is not None else marker.options[0])
    if isinstance(marker, GradientParam):
        return marker.init_values() or [(marker.low + marker.high) / 2] * marker.points
    if marker.init is not None:
        return marker.init
    if isinstance(marker, IntParam):
        return (marker.low + marker.high) // 2
    return (marker.low + marker.high) / 2


def substitute(template: Any, values: dict[YamlPath, Any], path: YamlPath = ()) -> Any:
    """A copy of ``template`` with the value at each path of ``values`` replaced."""
    if path in values:
        return values[path]
    if isinstance(template, dict):
        return {k: substitute(v, values, (*path, k)) for k, v in template.items()}
    if isinstance(template, list):
        return [substitute(v, values, (*path, i)) for i, v in enumerate(template)]
    return template


def _template_positions(pos: PositionedYaml, data: Any) -> PositionedYaml:
    """The spec's positions re-keyed to paths inside the template, for the recipe loader."""
    n = len(("template",))
    inner = PositionedYaml(data=data)
    inner.values = {p[n:]: m for p, m in pos.values.items() if p[:n] == ("template",)}
    inner.keys = {p[n:]: m for p, m in pos.keys.items() if p[:n] == ("template",) and len(p) > n}
    return inner


def _check_template(
    loaded_pos: PositionedYaml, template: dict[str, Any], markers: list[FoundMarker], source: str
) -> list[str]:
    """The recipe loader's verdict on the template, once per merge method a choice may pick."""
    method_choices = [m for m in markers if m.path == ("merge_method",) and isinstance(m.marker, ChoiceParam)]
    options = method_choices[0].marker.options if method_choices else [None]
    lines: list[str] = []
    for option in options:
        values = {m.path: representative(m.marker, option if m in method_choices else None) for m in markers}
        data = substitute(template, values)
        _loaded, errs = validate_document(
            _template_positions(loaded_pos, data), "", source, None, whole=True, strict=False
        )
        suffix = f" (with merge_method {option})" if option is not None and len(options) > 1 else ""
        lines += [f"{line}{suffix}" for line in errs if f"{line}{suffix}" not in lines]
    return lines


def _check_files(terms: list[tuple[YamlPath, Term]], base_dir: Path, problems: PositionedProblems) -> None:
    for where, term in terms:
        for field in TERM_FILE_KEYS:
            value = getattr(term, field, None)
            if value is not None and resolve_file(value, base_dir) is None:
                problems.add(
                    (*where, field), f"no such file or folder: {value} (looked in the working directory and {base_dir})"
                )


def resolve_file(value: str, base_dir: Path) -> Path | None:
    """A file or folder named in the spec: as written (relative to the working directory), then relative
    to the spec's folder; the same rule as model folders in recipes."""
    p = Path(value).expanduser()
    if p.exists():
        return p.resolve()
    if not p.is_absolute() and (base_dir / p).exists():
        return (base_dir / p).resolve()
    return None


def parse_search(text: str, source: str = "<search>", path: Path | None = None) -> LoadedSearch:
    """Validate a search spec; raises one RecipeError listing every problem as file:line:col lines."""
    try:
        pos = load_positioned(text)
    except YamlSyntaxError as exc:
        where = f"{source}:{exc.mark.line}:{exc.mark.column}" if exc.mark else source
        raise RecipeError([f"{where}: {exc}"]) from None
    problems = PositionedProblems(source, pos)
    for dup_path, _mark in pos.duplicates:
        problems.add(dup_path, "duplicate key (the later value would silently win)", key=True)
    if not isinstance(pos.data, dict):
        raise RecipeError([f"{source}: expected a mapping with name, template, objective, budget"])
    spec: SearchSpec | None = None
    try:
        spec = SearchSpec.model_validate(pos.data)
    except ValidationError as exc:
        add_validation_errors(exc, problems, (), lambda loc: _model_for(loc, pos.data), set(TERM_MODELS))
    template = pos.data.get("template")
    markers = _check_markers(template, problems) if isinstance(template, dict) else []
    terms = _valid_terms(pos.data)
    _check_names(markers, terms, problems)
    _check_files(terms, path.parent if path else Path.cwd(), problems)
    lines: list[str] = []
    if spec is not None and not problems.items:
        if not markers:
            problems.add(
                ("template",), "no free parameters: write e.g. weight: {search: float, low: 0, high: 2}", key=True
            )
        lines = _check_template(pos, spec.template, markers, source)
    if problems.items or lines or spec is None:
        raise RecipeError(problems.lines() + lines)
    return LoadedSearch(spec, tuple(markers), text, path, pos)


def load_search(path: str | Path) -> LoadedSearch:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([f"{p}: no such search spec"]) from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise RecipeError([f"{p}: cannot read the search spec ({exc})"]) from None
    return parse_search(text, source=str(path), path=p.resolve())


def search_json_schema() -> dict[str, Any]:
    schema = SearchSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mergekitlite search spec"
    # The template is a recipe whose values may be free parameters: the markers are documented here (an editor
    # cannot check the template itself, whose values may be either).
    marker = MARKER.json_schema(ref_template="#/$defs/{model}")
    schema["$defs"].update(marker.pop("$defs"))
    schema["$defs"]["FreeParameter"] = marker
    return schema
