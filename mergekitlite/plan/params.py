"""Stage 4 — the parameter values of one tensor: each parameter evaluated at the first level that sets it
(a rule's parameters, the model's, the slice's, the recipe's global ones), at the tensor's layer position,
then checked by the method's own declaration."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mergekitlite.methods import MethodSpec
from mergekitlite.methods.registry import param_kind
from mergekitlite.plan.problems import Problems
from mergekitlite.recipe import Parameters, Recipe
from mergekitlite.settings import evaluate, is_gradient
from mergekitlite.sources import ModelSource

Levels = Sequence[Parameters | None]  # most specific first


def _first(levels: Levels, pname: str, tensor: str, t: float) -> Any | None:
    for level in levels:
        if level and pname in level:
            value = evaluate(level[pname], tensor, t)
            if value is not None:
                return value
    return None


def _coerce(name: str, value: Any, default: Any, where: str, problems: Problems) -> Any:
    """The value as the method wants it. Booleans written as 0/1 are accepted, as mergekit (whose
    older tools wrote every parameter as a float) does; anything else of the wrong kind is a problem
    (the recipe loader reports most of them earlier, with positions)."""
    kind = param_kind(default)
    if kind == "bool" and isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if kind == "bool" and not isinstance(value, bool):
        problems.add(f"{where}: parameter '{name}' must be true or false, got {value!r}", group=f"type:{name}")
    elif kind == "number" and isinstance(value, (bool, str)):
        problems.add(f"{where}: parameter '{name}' must be a number, got {value!r}", group=f"type:{name}")
    return value


def resolve_params(
    spec: MethodSpec,
    tensor: str,
    t: float,
    model_levels: Sequence[Levels],
    model_names: Sequence[str],
    global_levels: Levels,
    problems: Problems,
) -> tuple[tuple[str, Any], ...]:
    """Every parameter of ``spec`` for ``tensor``: global ones as values, per-model ones as tuples aligned
    with ``model_names``; sorted by name (the task's identity)."""
    resolved: dict[str, Any] = {}
    for p in spec.global_params:
        value = _first(global_levels, p.name, tensor, t)
        if value is None:
            if p.required:
                problems.add(f"{tensor}: {spec.name} needs parameter '{p.name}'", group=f"missing:{p.name}")
                continue
            value = p.default
        else:
            value = _coerce(p.name, value, p.default, tensor, problems)
        resolved[p.name] = value
    for p in spec.model_params:
        values = []
        for levels, model in zip(model_levels, model_names):
            value = _first(levels, p.name, tensor, t)
            if value is None:
                if p.required:
                    problems.add(
                        f"{tensor}: {spec.name} needs parameter '{p.name}' for model {model!r} "
                        "(no rule or filter gives one for this tensor)",
                        group=f"missing:{p.name}:{model}",
                    )
                value = p.default
            else:
                value = _coerce(p.name, value, p.default, f"{tensor} (model {model!r})", problems)
            values.append(value)
        resolved[p.name] = tuple(values)
    # Every value's range and the method's own cross-parameter rules (e.g. della's density ± epsilon).
    for line in spec.check(resolved, model_names):
        problems.add(f"{tensor}: {line}", group=f"check:{spec.name}:{line.split(':', 1)[0]}")
    return tuple(sorted(resolved.items()))


def all_parameters(recipe: Recipe) -> list[tuple[str, Parameters]]:
    """Every ``parameters`` mapping of the recipe with where it is (for messages)."""
    out: list[tuple[str, Parameters]] = []
    if recipe.parameters:
        out.append(("parameters", recipe.parameters))
    for i, m in enumerate(recipe.models or ()):
        if m.parameters:
            out.append((f"models[{i}].parameters", m.parameters))
    for i, s in enumerate(recipe.slices or ()):
        if s.parameters:
            out.append((f"slices[{i}].parameters", s.parameters))
        for j, src in enumerate(s.sources):
            if src.parameters:
                out.append((f"slices[{i}].sources[{j}].parameters", src.parameters))
    return out


def gradients_without_layers(recipe: Recipe, sources: dict[str, ModelSource], reference: ModelSource) -> list[str]:
    """Gradients are lists of values over the layers: they mean nothing when no model has numbered layers."""
    if any(src.layer_counts for src in sources.values()):
        return []
    example = next(iter(reference.tensors), "?")
    return [
        f"{where}.{pname}: a gradient (list of values over the layers) needs numbered layers, but no model has any "
        f"(e.g. {reference.ref!r} has tensors like {example!r}); give a single value"
        for where, params in all_parameters(recipe)
        for pname, setting in params.items()
        if is_gradient(setting)
    ]
