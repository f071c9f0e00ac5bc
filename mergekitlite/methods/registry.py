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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from mergekitlite.errors import UnknownMethodError

REQUIRED: Any = inspect.Parameter.empty

BaseUse = Literal["required", "optional", "unused"]


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
    # True when output rows depend only on the same rows of the inputs, so the executor may
    # merge a tensor in row slices; False for methods with whole-tensor statistics.
    elementwise: bool
    summary: str
    reference: str | None = None
    aliases: tuple[str, ...] = field(default=())

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    def __call__(self, base: Tensor | None, models: list[Tensor], params: Mapping[str, Any]) -> Tensor:
        """Call the method with recipe-spelled parameter names."""
        kwargs = {_py_name(k): v for k, v in params.items()}
        return self.fn(base, models, **kwargs)


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
        raise UnknownMethodError(
            [f"unknown merge method {name!r}{hint}; known methods: {', '.join(self.names())}"]
        )

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
    registry: Registry = REGISTRY,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn`` under ``name``. Parameters and defaults are read from its keyword-only
    arguments, so the signature is the single source of truth; ``per_model`` names those that
    take one value per input model, mapped to the default for one model (``REQUIRED`` if none)."""
    per_model = dict(per_model or {})

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        sig = inspect.signature(fn)
        params = tuple(
            Param(name_, per_model[name_], True)
            if (name_ := _recipe_name(p.name)) in per_model
            else Param(name_, p.default, False)
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        )
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
            )
        )
        return fn

    return wrap
