"""What a merge method is, without its arithmetic: declarations that import no torch.

A method is a pure function ``fn(base, models, **params) -> Tensor``: ``base`` is the base model's
tensor (or ``None`` for methods that take none), ``models`` the other inputs in recipe order, and
each per-model parameter arrives as a tuple aligned with ``models``. Methods see tensors only: no
names, files, shards or devices.

Everything the recipe loader, the planner and the executor must know about a method — its
parameters with their defaults and valid ranges, whether it needs a base, how many models it takes,
whether row slices of a tensor can be merged independently, its working space — is declared in a
``MethodSpec`` (the declarations are in ``catalog``). The tensor code lives in an implementation
module that exposes ``IMPLEMENTATIONS: Mapping[str, Implementation]``; it is imported the first time
a method is called, its statistic made or its linear form built, and checked against the declaration
then (``verify``), so the two cannot drift apart. Loading a recipe therefore never imports torch.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from mergekitlite.errors import UnknownMethodError

if TYPE_CHECKING:
    from torch import Tensor

REQUIRED: Any = inspect.Parameter.empty

BaseUse = Literal["required", "optional", "unused"]

# Keyword-only arguments that the executor supplies; they are not recipe parameters.
EXECUTOR_ARGS = frozenset({"chunk", "stats"})


def tensor_rows(shape: Sequence[int]) -> int:
    """Rows of a tensor of this shape, as chunks cut it: dim 0, and one for a scalar."""
    return shape[0] if len(shape) else 1


def tensor_seed(random_seed: int, tensor_name: str) -> int:
    """A per-tensor seed (63 bits) from the recipe seed and the output tensor name."""
    digest = hashlib.sha256(f"{random_seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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

    # Optional, not part of the protocol's required surface: ``update_raw(state, pass_index, raw, codes,
    # params, chunk) -> bool`` folds a chunk in from its inputs' raw bytes (contiguous uint8 CPU tensors,
    # the base first, with their safetensors dtype codes) with a native kernel, with the same result as
    # ``update`` on their float32 values. False: nothing was recorded, call ``update`` instead.


class NativeMerge(Protocol):
    """A method's native merge of one task's chunks: the inputs' raw bytes (contiguous uint8 buffers, numpy
    arrays or CPU tensors, in the task's input order, the base first) to the output's raw bytes in ``out``,
    the same bits as the torch path on float32. Returns the NaN/±inf it met, as ``(per input read, written,
    written but finite before the cast)`` (see ``nonfinite``), or None when it cannot reproduce the torch
    path's bits for this chunk (``out`` is then garbage, and the caller runs the torch path for the chunk)."""

    def __call__(self, raw: Sequence[Any], out: Any, chunk: ChunkInfo, stats: Any) -> Any: ...


class NativeKernel(Protocol):
    """``Implementation.native``: prepares a ``NativeMerge`` for one task (its inputs, parameters and
    safetensors dtype codes; float32 compute on the CPU), or None when the kernel does not take it."""

    def prepare(
        self, has_base: bool, n_models: int, params: Mapping[str, Any], in_codes: Sequence[str], out_code: str
    ) -> NativeMerge | None: ...


# ---------------------------------------------------------------------------------------------
# Parameters


def param_kind(default: Any) -> str:
    """'bool' or 'number' (what a recipe value must be), from the parameter's default."""
    return "bool" if isinstance(default, bool) else "number"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Range:
    """The values a number parameter may take: finite, between optional bounds (``*_open``: the bound
    itself excluded), and whole numbers only with ``whole``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    whole: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value) or (self.whole and value != int(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        """What the range asks for, as the end of "must be ...": 'between 0 and 1', 'at least 0'..."""
        if self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            bounds = [f"between {self.low:g} and {self.high:g}"]
        else:
            bounds = [
                f"{word} {bound:g}"
                for bound, word in (
                    (self.low, "greater than" if self.low_open else "at least"),
                    (self.high, "less than" if self.high_open else "at most"),
                )
                if bound is not None
            ]
        kind = ["a whole number"] if self.whole else [] if bounds else ["a finite number"]
        return " ".join([*kind, " and ".join(bounds)] if bounds else kind)

    def problem(self, value: float) -> str | None:
        """``None`` when ``value`` is in the range, else 'must be ..., got ...'."""
        if self.contains(value):
            return None
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        return f"must be {self.describe()}, got {value!r}"

    def json_schema(self) -> dict[str, Any]:
        """The bounds as JSON-Schema keywords (which apply to numbers only)."""
        out: dict[str, Any] = {}
        if self.low is not None:
            out["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high is not None:
            out["exclusiveMaximum" if self.high_open else "maximum"] = self.high
        if self.whole:
            out["multipleOf"] = 1
        return out


FINITE = Range()


@dataclass(frozen=True)
class Param:
    """A recipe parameter of a method. ``name`` is the recipe spelling (``lambda``, not ``lambda_``);
    ``valid``: the values a number parameter may take (booleans take true/false, or 0/1)."""

    name: str
    default: Any
    per_model: bool
    doc: str = ""
    valid: Range = FINITE

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def kind(self) -> str:
        return param_kind(self.default)

    def check(self, value: Any) -> str | None:
        """Why one value (a literal in the recipe, or one resolved value) is not acceptable; ``None`` if it is."""
        if self.kind == "bool":
            ok = isinstance(value, bool) or (_is_number(value) and value in (0, 1))
            return None if ok else f"expected true or false, got {value!r}"
        if not _is_number(value):
            return None if value is None and self.default is None else f"expected a number, got {value!r}"
        return self.valid.problem(value)


# A check across a method's parameters: the fully resolved parameters of one tensor (recipe names;
# per-model ones as tuples) → one message per problem, naming the parameter (and the model).
Constraint = Callable[[Mapping[str, Any], Sequence[str]], list[str]]


def model_label(models: Sequence[str], i: int) -> str:
    """How a message names the i-th model of a tensor's parameters."""
    return f"model {models[i]!r}" if i < len(models) else f"model {i}"


# ---------------------------------------------------------------------------------------------
# Implementations


@dataclass(frozen=True)
class Implementation:
    """A method's tensor code: ``fn(base, models, **params)``, its statistic factory (one fresh object
    per tensor) and, for linear methods, the builder of its ``LinearForm`` from (base position, model
    positions, **params), which the native kernel evaluates instead of ``fn``. ``stats_form`` is that
    builder for methods whose result is a linear form with coefficients from their statistic (slerp:
    c₀·base + c₁·model from the angle), called with ``stats=`` once the statistic is known. Other methods
    may declare a ``native`` kernel of their own (``NativeKernel``), which the executor prefers where it
    takes the task."""

    fn: Callable[..., Any]
    statistic: Callable[[], Statistic] | None = None
    linear_form: Callable[..., Any] | None = None
    stats_form: Callable[..., Any] | None = None
    native: NativeKernel | None = None

    @property
    def declares_params(self) -> Callable[..., Any]:
        """The function whose keyword-only arguments are the method's parameters."""
        return self.linear_form if self.linear_form is not None else self.fn


def verify(spec: MethodSpec, impl: Implementation) -> None:
    """Raise ``TypeError`` where an implementation disagrees with its declaration: every keyword-only
    argument (besides ``chunk`` and ``stats``) must be a declared parameter, without a default of its own
    (the declaration holds the defaults); declared parameters the function does not name go to its
    ``**kwargs``; statistic, linear form and ``chunk`` (random methods need it) as declared."""
    problems = []
    sig = inspect.signature(impl.declares_params)
    declared = {_py_name(p.name) for p in spec.params}
    named = {
        n: p for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in EXECUTOR_ARGS
    }
    if extra := sorted(set(named) - declared):
        problems.append(f"takes {extra}, which the declaration does not list")
    if (set(named) != declared) and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        problems.append(f"does not take {sorted(declared - set(named))} (name them, or take **kwargs)")
    if defaulted := sorted(n for n, p in named.items() if p.default is not inspect.Parameter.empty):
        problems.append(f"repeats defaults for {defaulted}: the declaration holds them")
    if (impl.statistic is not None) != spec.has_statistic:
        problems.append(f"has {'a' if impl.statistic else 'no'} statistic, against its declaration")
    if impl.statistic is not None and "stats" not in inspect.signature(impl.fn).parameters:
        problems.append("has a statistic but no keyword-only 'stats' argument")
    if (impl.linear_form is not None) != spec.linear:
        problems.append(f"has {'a' if impl.linear_form else 'no'} linear form, against its declaration")
    if impl.stats_form is not None and impl.statistic is None:
        problems.append("has a form built from its statistic, but no statistic")
    if spec.random and "chunk" not in inspect.signature(impl.fn).parameters:
        problems.append("is declared random but takes no 'chunk' (its seed)")
    if problems:
        raise TypeError(f"merge method {spec.name!r}: its implementation " + "; ".join(problems))


def load_implementation(spec: MethodSpec) -> Implementation:
    """Import the method's implementation module and check what it holds for the method."""
    module = importlib.import_module(spec.implementation)
    impl = getattr(module, "IMPLEMENTATIONS", {}).get(spec.name)
    if impl is None:
        raise TypeError(f"merge method {spec.name!r}: {spec.implementation} has no implementation of it")
    verify(spec, impl)
    return impl


# ---------------------------------------------------------------------------------------------
# Declarations


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: tuple[Param, ...]
    base: BaseUse
    implementation: str  # module whose IMPLEMENTATIONS holds the tensor code (imported when first needed)
    summary: str
    min_models: int = 1
    max_models: int | None = None
    # True when output elements depend only on the same elements of the inputs, so the executor
    # may merge a tensor in any row slices; otherwise its statistic supplies what needs the whole tensor.
    elementwise: bool = True
    reference: str | None = None
    aliases: tuple[str, ...] = field(default=())
    has_statistic: bool = False  # whole-tensor statistic passes before the merge pass
    random: bool = False  # uses ``chunk.seed``: recipes get a recorded seed
    linear: bool = False  # a ``LinearForm`` the native kernel can evaluate
    # Working space besides the inputs, in chunk-sized compute-dtype arrays: ``base + per_model·n``,
    # for the merge and for each statistic pass. The planner sizes chunks with it (on a GPU, for
    # --max-vram); tests/test_working_set.py measures every method against its declaration.
    temporaries_base: int = 2
    temporaries_per_model: int = 0
    constraints: tuple[Constraint, ...] = ()  # checks across parameters (see ``check``)

    def __post_init__(self) -> None:
        if not self.elementwise and not self.has_statistic:
            raise ValueError(f"{self.name}: a method that is not elementwise needs a statistic")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: a parameter is declared twice: {names}")

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

    def check(self, params: Mapping[str, Any], model_names: Sequence[str] = ()) -> list[str]:
        """The problems of one tensor's fully resolved parameters (recipe names; global ones as scalars,
        per-model ones as tuples aligned with the models): each value's range, then the constraints
        across parameters. Messages name the parameter, and the model (by ``model_names``, else by its
        0-based position) for per-model ones, never the tensor. Absent and unset (``REQUIRED``) values
        are skipped: a missing parameter is the planner's message."""
        problems = []
        unset = False
        for p in self.params:
            value = params.get(p.name, REQUIRED)
            values = enumerate(value) if p.per_model and isinstance(value, (tuple, list)) else [(None, value)]
            for i, v in values:
                unset |= v is REQUIRED
                if v is REQUIRED or (problem := p.check(v)) is None:
                    continue
                problems.append(f"{p.name}{'' if i is None else ' of ' + model_label(model_names, i)}: {problem}")
        if problems or unset:  # constraints assume every value set, of the right kind and in range
            return problems
        for constraint in self.constraints:
            problems.extend(constraint(params, model_names))
        return problems

    # The tensor code, loaded on first use.

    @functools.cached_property
    def _impl(self) -> Implementation:
        return load_implementation(self)

    @property
    def fn(self) -> Callable[..., Tensor]:
        return self._impl.fn

    @property
    def statistic(self) -> Callable[[], Statistic] | None:
        """Factory of the method's statistic (one fresh object per tensor), or ``None``."""
        return self._impl.statistic if self.has_statistic else None

    @property
    def linear_form(self) -> Callable[..., Any] | None:
        return self._impl.linear_form if self.linear else None

    @functools.cached_property
    def wants_chunk(self) -> bool:
        """The function takes ``chunk=ChunkInfo`` (e.g. for seeded randomness)."""
        return "chunk" in inspect.signature(self.fn).parameters

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
        if self.has_statistic:
            kwargs["stats"] = stats
        return self.fn(base, models, **kwargs)

    def form(self, has_base: bool, n_models: int, params: Mapping[str, Any], stats: Any = None) -> Any:
        """The ``LinearForm`` of the method for these inputs, parameters and (for a method whose form comes
        from its statistic) the tensor's statistic; None for methods that are not linear forms."""
        kwargs = {_py_name(k): v for k, v in params.items()}
        if self.linear_form is not None:
            return self.linear_form(*input_positions(has_base, n_models), **kwargs)
        if self.has_statistic and self._impl.stats_form is not None:
            return self._impl.stats_form(*input_positions(has_base, n_models), stats=stats, **kwargs)
        return None

    def native_merge(
        self, has_base: bool, n_models: int, params: Mapping[str, Any], in_codes: Sequence[str], out_code: str
    ) -> NativeMerge | None:
        """The method's own native kernel (``Implementation.native``) prepared for one task (float32 compute
        on the CPU), or None. Linear forms (``form``) go to the linear kernel instead."""
        kernel = self._impl.native
        return None if kernel is None else kernel.prepare(has_base, n_models, params, in_codes, out_code)


def input_positions(has_base: bool, n_models: int) -> tuple[int | None, tuple[int, ...]]:
    """Positions of the base and of the models in a task's input list (the base comes first)."""
    first = 1 if has_base else 0
    return (0 if has_base else None), tuple(range(first, first + n_models))


def _py_name(recipe_name: str) -> str:
    return recipe_name + "_" if recipe_name in {"lambda"} else recipe_name


@dataclass
class Registry:
    """Name → MethodSpec. Rejects duplicates; unknown names get the nearest suggestion."""

    methods: dict[str, MethodSpec] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, specs: Sequence[MethodSpec]) -> Registry:
        registry = cls()
        for spec in specs:
            registry.add(spec)
        return registry

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
