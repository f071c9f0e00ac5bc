"""One registry of merge methods, filled by the ``@merge_method`` decorator.

A method is a pure function ``fn(base, models, **params) -> Tensor``: ``base`` is the base model's
tensor (or ``None`` for methods that take none), ``models`` the other inputs in recipe order, and
each per-model parameter arrives as a tuple aligned with ``models``. Methods see tensors only:
no names, files, shards or devices. Anything the planner and executor must know about a method
(its parameters, whether it needs a base, whether row slices of a tensor can be merged
independently) is declared here, next to the function.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from torch import Tensor

from mergekitlite.errors import UnknownMethodError

REQUIRED: Any = inspect.Parameter.empty

BaseUse = Literal["required", "optional", "unused"]

# Keyword-only arguments that the executor supplies; they are not recipe parameters.
EXECUTOR_ARGS = frozenset({"chunk", "stats"})


@dataclass(frozen=True)
class ChunkInfo:
    """Where the rows a method is given lie in the whole tensor.

    Methods that draw random numbers derive them from ``seed`` and each element's flat index
    (``flat_start`` + position), never from a stateful generator, so the result does not depend on
    how the executor cuts the tensor or on the device.
    """

    row_start: int
    row_end: int
    shape: tuple[int, ...]  # of the whole tensor
    seed: int  # per tensor: derived from the recipe's random_seed and the tensor name

    @property
    def row_elements(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def flat_start(self) -> int:
        return self.row_start * self.row_elements


class Statistic(Protocol):
    """Whole-tensor statistics for methods that are not elementwise (top-k thresholds, norms...).

    The executor makes passes over the tensor's row chunks before the merge pass, calling ``update``
    for every chunk and ``finish_pass`` after each pass; ``result`` is then given to the method as
    ``stats=``. ``passes`` is read after ``begin`` (which may set it for this tensor: e.g. none when
    every density is 1) and again after every ``finish_pass``, which may lower it when a later pass
    turns out to be unneeded (e.g. no tie to break at a top-k threshold): pass p is made while
    p < ``passes``. Chunks always hold whole rows.

    With ``concurrent`` set, ``update`` calls for the chunks of one pass may run at the same time on
    several threads and in any order; ``finish_pass`` runs once all of them have returned, and the
    result must be the one of the chunks taken one after the other in row order. So ``update`` only
    records per-row quantities (to disjoint slices: no lock needed) or integer counts and histograms
    (added under a lock held only for the addition); float partials are reduced once, in a fixed
    order, in ``finish_pass``/``result``, and anything that needs the rows in order (how many ties
    precede a row) is derived there from per-row counts. The same rules make the result identical
    however the tensor is cut. Shared state is created in ``begin``, never lazily in ``update``.

    ``MethodSpec.statistic`` is a factory; the executor reads ``concurrent`` off the factory before
    making a statistic, so a factory that is not the class itself must carry the flag too
    (``primitives.StatisticFactory`` does).
    """

    passes: int
    # True when ``update`` may run for different chunks of a pass at the same time, in any order,
    # from several threads (the executor then spreads a pass over its workers).
    concurrent: bool

    def begin(self, shape: tuple[int, ...], n_models: int, params: Mapping[str, Any]) -> Any: ...

    def update(
        self,
        state: Any,
        pass_index: int,
        base: Tensor | None,
        models: list[Tensor],
        params: Mapping[str, Any],
        chunk: ChunkInfo,
    ) -> None: ...

    def finish_pass(self, state: Any, pass_index: int) -> None: ...

    def result(self, state: Any) -> Any: ...


def param_kind(default: Any) -> str:
    """'bool' or 'number' (what a recipe value must be), from the parameter's default."""
    return "bool" if isinstance(default, bool) else "number"


@dataclass(frozen=True)
class Param:
    """A recipe parameter of a method. ``name`` is the recipe spelling (``lambda``, not ``lambda_``)."""

    name: str
    default: Any
    per_model: bool
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., Tensor]
    params: tuple[Param, ...]
    base: BaseUse
    min_models: int
    max_models: int | None
    # True when output elements depend only on the same elements of the inputs, so the executor
    # may merge a tensor in any row slices; otherwise ``statistic`` supplies what needs the whole tensor.
    elementwise: bool
    summary: str
    reference: str | None = None
    aliases: tuple[str, ...] = field(default=())
    statistic: Callable[[], Statistic] | None = None  # factory: one fresh object per tensor
    # Working space besides the inputs, in chunk-sized compute-dtype arrays: ``base + per_model·n``,
    # for the merge and for each statistic pass. The planner sizes chunks with it (on a GPU, for
    # --max-vram); tests/test_working_set.py measures every method against its declaration.
    temporaries_base: int = 2
    temporaries_per_model: int = 0
    wants_chunk: bool = False  # the function takes ``chunk=ChunkInfo`` (e.g. for seeded randomness)
    random: bool = False  # uses ``chunk.seed``: recipes get a recorded seed
    # For linear methods: builds the method's ``linear_form.LinearForm`` from (base position, model
    # positions, **params), which the native kernel can evaluate instead of ``fn``.
    linear_form: Callable[..., Any] | None = None

    def temporaries(self, n_models: int) -> int:
        return self.temporaries_base + self.temporaries_per_model * n_models

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    def __call__(
        self,
        base: Tensor | None,
        models: list[Tensor],
        params: Mapping[str, Any],
        *,
        chunk: ChunkInfo | None = None,
        stats: Any = None,
    ) -> Tensor:
        """Call the method with recipe-spelled parameter names."""
        kwargs = {_py_name(k): v for k, v in params.items()}
        if self.wants_chunk:
            kwargs["chunk"] = chunk
        if self.statistic is not None:
            kwargs["stats"] = stats
        return self.fn(base, models, **kwargs)

    def form(self, has_base: bool, n_models: int, params: Mapping[str, Any]) -> Any:
        """The ``LinearForm`` of a linear method for these inputs and parameters; None for other methods."""
        if self.linear_form is None:
            return None
        return self.linear_form(*input_positions(has_base, n_models), **{_py_name(k): v for k, v in params.items()})


def input_positions(has_base: bool, n_models: int) -> tuple[int | None, tuple[int, ...]]:
    """Positions of the base and of the models in a task's input list (the base comes first)."""
    first = 1 if has_base else 0
    return (0 if has_base else None), tuple(range(first, first + n_models))


def _py_name(recipe_name: str) -> str:
    return recipe_name + "_" if recipe_name in {"lambda"} else recipe_name


def _recipe_name(py_name: str) -> str:
    return py_name[:-1] if py_name.endswith("_") else py_name


@dataclass
class Registry:
    """Name → MethodSpec. Rejects duplicates; unknown names get the nearest suggestion."""

    methods: dict[str, MethodSpec] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def add(self, spec: MethodSpec) -> None:
        for name in (spec.name, *spec.aliases):
            if name in self.methods or name in self.aliases:
                raise ValueError(f"merge method {name!r} is registered twice")
        self.methods[spec.name] = spec
        for alias in spec.aliases:
            self.aliases[alias] = spec.name

    def names(self) -> list[str]:
        return sorted([*self.methods, *self.aliases])

    def get(self, name: str) -> MethodSpec:
        key = self.aliases.get(name, name)
        if key in self.methods:
            return self.methods[key]
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownMethodError([f"unknown merge method {name!r}{hint}; known methods: {', '.join(self.names())}"])

    def all_param_names(self) -> set[str]:
        return {p.name for spec in self.methods.values() for p in spec.params}


REGISTRY = Registry()


def merge_method(
    name: str,
    *,
    base: BaseUse,
    per_model: Mapping[str, Any] | None = None,
    min_models: int = 1,
    max_models: int | None = None,
    elementwise: bool = True,
    reference: str | None = None,
    aliases: tuple[str, ...] = (),
    statistic: Callable[[], Statistic] | None = None,
    random: bool = False,
    linear_form: Callable[..., Any] | None = None,
    temporaries: tuple[int, int] = (2, 0),
    registry: Registry = REGISTRY,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn`` under ``name``. Parameters and defaults are read from its keyword-only
    arguments, so the signature is the single source of truth; ``per_model`` names those that
    take one value per input model, mapped to the default for one model (``REQUIRED`` if none).
    ``temporaries``: (base, per model) chunk-sized arrays the method allocates besides its inputs."""
    per_model = dict(per_model or {})

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        sig = inspect.signature(fn)
        params = tuple(
            Param(name_, per_model[name_], True)
            if (name_ := _recipe_name(p.name)) in per_model
            else Param(name_, p.default, False)
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in EXECUTOR_ARGS
        )
        if statistic is not None and "stats" not in sig.parameters:
            raise ValueError(f"{name}: a method with a statistic must take a keyword-only 'stats' argument")
        if not elementwise and statistic is None:
            raise ValueError(f"{name}: a method that is not elementwise needs a statistic")
        unknown = set(per_model) - {p.name for p in params}
        if unknown:
            raise ValueError(f"{name}: per_model names {sorted(unknown)} are not keyword-only arguments")
        summary = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
        registry.add(
            MethodSpec(
                name=name,
                fn=fn,
                params=params,
                base=base,
                min_models=min_models,
                max_models=max_models,
                elementwise=elementwise,
                summary=summary,
                reference=reference,
                aliases=aliases,
                statistic=statistic,
                wants_chunk="chunk" in sig.parameters,
                random=random,
                linear_form=linear_form,
                temporaries_base=temporaries[0],
                temporaries_per_model=temporaries[1],
            )
        )
        return fn

    return wrap
