"""The search space: the template's free parameters as optuna dimensions, and a trial's values back into a recipe.

Each ``float``/``int`` marker is one dimension, a ``gradient`` of K points is K dimensions (``name[0]`` ..
``name[K-1]``), a ``choice`` is one categorical dimension. Optuna is imported only where a study is driven;
materializing a recipe needs none of it (trial workers never import optuna).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from mergekitlite.evolve.spec import (
    ChoiceParam,
    FloatParam,
    GradientParam,
    IntParam,
    LoadedSearch,
    YamlPath,
    representative,
    substitute,
)
from mergekitlite.recipe import format_path

# Keys of a recipe whose string values name models (and may be rewritten to absolute folders for trials).
MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source", "take")


@dataclass(frozen=True)
class Dimension:
    name: str  # the optuna parameter name
    marker_path: YamlPath  # where the marker is in the template
    point: int | None  # index in a gradient; None for scalars and choices
    marker: FloatParam | IntParam | GradientParam | ChoiceParam

    @property
    def categorical(self) -> bool:
        return isinstance(self.marker, ChoiceParam)

    def describe(self) -> str:
        m = self.marker
        if isinstance(m, ChoiceParam):
            return "one of " + ", ".join(map(str, m.options))
        kind = "integer" if isinstance(m, IntParam) else "log-scale number" if getattr(m, "log", False) else "number"
        return f"{kind} in [{m.low}, {m.high}]"

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        m = self.marker
        if isinstance(m, ChoiceParam):
            return CategoricalDistribution(m.options)
        if isinstance(m, IntParam):
            return IntDistribution(m.low, m.high)
        return FloatDistribution(float(m.low), float(m.high), log=getattr(m, "log", False))

    def baseline(self) -> Any:
        value = representative(self.marker)
        return value[self.point] if self.point is not None else value


class SearchSpace:
    def __init__(self, loaded: LoadedSearch):
        self.template = loaded.spec.template
        dims = []
        for found in loaded.markers:
            name = found.marker.name or format_path(found.path)
            if isinstance(found.marker, GradientParam):
                dims += [Dimension(f"{name}[{k}]", found.path, k, found.marker) for k in range(found.marker.points)]
            else:
                dims.append(Dimension(name, found.path, None, found.marker))
        self.dimensions: tuple[Dimension, ...] = tuple(dims)

    def distributions(self) -> dict[str, Any]:
        return {d.name: d.distribution() for d in self.dimensions}

    def baseline(self) -> dict[str, Any]:
        """The template's init values (the middle of a range, the first choice where none is given)."""
        return {d.name: d.baseline() for d in self.dimensions}

    def fingerprint(self) -> str:
        """Identifies the space: a study made for another space cannot be resumed with this one."""
        described = [(d.name, d.describe(), format_path(d.marker_path)) for d in self.dimensions]
        return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """The trial's value of every dimension (sampled, or fixed for an enqueued or retried trial)."""
        values: dict[str, Any] = {}
        for d in self.dimensions:
            m = d.marker
            if isinstance(m, ChoiceParam):
                values[d.name] = trial.suggest_categorical(d.name, m.options)
            elif isinstance(m, IntParam):
                values[d.name] = trial.suggest_int(d.name, m.low, m.high)
            else:
                values[d.name] = trial.suggest_float(d.name, float(m.low), float(m.high), log=getattr(m, "log", False))
        return values

    def recipe_data(self, params: Mapping[str, Any], models: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The template with every marker replaced by the trial's values; model references found in
        ``models`` are replaced by their value (trials use absolute folders; the shared recipe keeps the
        references as written)."""
        values: dict[YamlPath, Any] = {}
        for d in self.dimensions:
            if d.point is None:
                values[d.marker_path] = params[d.name]
            else:
                values.setdefault(d.marker_path, [None] * d.marker.points)[d.point] = params[d.name]
        data = substitute(self.template, values)
        return _rename_models(data, models) if models else data


def _rename_models(node: Any, models: Mapping[str, str], key: Any = None) -> Any:
    if isinstance(node, dict):
        return {k: _rename_models(v, models, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_rename_models(v, models, key) for v in node]
    if isinstance(node, str) and key in MODEL_KEYS:
        return models.get(node, node)
    return node


class _RecipeDumper(yaml.SafeDumper):
    """Block style, except lists of scalars (gradients) on one line, as recipes are written by hand."""

    def represent_list(self, data: list[Any]) -> yaml.Node:
        flow = all(not isinstance(v, dict | list) for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _RecipeDumper.represent_list)


def recipe_yaml(data: Mapping[str, Any], header: str = "") -> str:
    """A recipe file: ``header`` comment lines, then the recipe in mergekit's format (keys in template order;
    floats as Python writes them, so the file holds exactly the values that were scored)."""
    body = yaml.dump(dict(data), Dumper=_RecipeDumper, sort_keys=False, allow_unicode=True, width=120)
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return comment + body
