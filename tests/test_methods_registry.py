"""Method declarations: importable without torch, checked against their implementations, the
generalized-task-arithmetic family as one table, and every parameter's valid range."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from builders import subprocess_env

from mergekitlite.methods import REGISTRY, REQUIRED, Implementation, MethodSpec, Param, Range, get_method
from mergekitlite.methods.catalog import GTA_FAMILY
from mergekitlite.methods.registry import load_implementation, verify


def test_declarations_and_recipe_checks_import_no_torch() -> None:
    """Loading a recipe, looking a method up and checking its parameters never imports torch."""
    code = """
import sys
import mergekitlite.recipe, mergekitlite.methods
spec = mergekitlite.methods.get_method('ties')
assert spec.check({'weight': (1.0,), 'density': (1.5,)}) == ["density of model 0: must be between 0 and 1, got 1.5"]
assert spec.params and spec.has_statistic and spec.temporaries(2) == 8
mergekitlite.methods.REGISTRY.all_param_names()
text = 'merge_method: ties\\nbase_model: b\\nmodels:\\n  - model: a\\n    parameters: {weight: 1, density: 0.5}\\n'
mergekitlite.recipe.parse_recipe(text)
mergekitlite.recipe.recipe_json_schema()
print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))
"""
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", f"torch was imported: {run.stdout}"


# ---------------------------------------------------------------------------------------------
# Declarations against implementations


@pytest.mark.parametrize("name", sorted(REGISTRY.methods))
def test_every_implementation_matches_its_declaration(name: str) -> None:
    spec = REGISTRY.methods[name]
    impl = load_implementation(spec)  # raises TypeError on any disagreement
    assert (impl.statistic is not None) == spec.has_statistic == (spec.statistic is not None)
    assert (impl.linear_form is not None) == spec.linear
    assert spec.wants_chunk or not spec.random


def test_no_implementation_is_left_undeclared() -> None:
    modules = {spec.implementation for spec in REGISTRY.methods.values()}
    declared = {(spec.implementation, name) for name, spec in REGISTRY.methods.items()}
    implemented = {(m, name) for m in modules for name in importlib.import_module(m).IMPLEMENTATIONS}
    assert implemented == declared


def _spec(params: tuple[Param, ...], **kw: Any) -> MethodSpec:
    return MethodSpec("probe", params, base="required", implementation="unused", summary="probe", **kw)


def _takes_weight(base: Any, models: Any, *, weight: Sequence[float]) -> Any:
    return base


def _takes_weight_with_default(base: Any, models: Any, *, weight: Sequence[float] = (1.0,)) -> Any:
    return base


def _takes_some(base: Any, models: Any, *, weight: Sequence[float], **others: Any) -> Any:
    return base


def _takes_stats(base: Any, models: Any, *, weight: Sequence[float], stats: Any = None) -> Any:
    return base


WEIGHT = Param("weight", REQUIRED, True)
DENSITY = Param("density", 1.0, True, valid=Range(0.0, 1.0))


@pytest.mark.parametrize(
    ("spec", "impl", "message"),
    [
        (_spec((DENSITY,)), Implementation(_takes_weight), r"takes \['weight'\], which the declaration does not list"),
        (_spec((WEIGHT, DENSITY)), Implementation(_takes_weight), r"does not take \['density'\]"),
        (_spec((WEIGHT,)), Implementation(_takes_weight_with_default), r"repeats defaults for \['weight'\]"),
        (_spec((WEIGHT,), has_statistic=True), Implementation(_takes_stats), "has no statistic, against"),
        (_spec((WEIGHT,)), Implementation(_takes_stats, statistic=dict), "has a statistic, against"),
        (
            _spec((WEIGHT,), has_statistic=True),
            Implementation(_takes_weight, statistic=dict),
            "no keyword-only 'stats'",
        ),
        (_spec((WEIGHT,), linear=True), Implementation(_takes_weight), "has no linear form"),
        (_spec((WEIGHT,), random=True), Implementation(_takes_weight), "declared random but takes no 'chunk'"),
    ],
)
def test_verify_rejects_an_implementation_that_drifted(spec: MethodSpec, impl: Implementation, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        verify(spec, impl)


def test_verify_accepts_parameters_left_to_kwargs() -> None:
    verify(_spec((WEIGHT, DENSITY)), Implementation(_takes_some))
    verify(_spec((WEIGHT,), has_statistic=True), Implementation(_takes_stats, statistic=dict))


def test_a_method_that_is_not_elementwise_must_declare_a_statistic() -> None:
    with pytest.raises(ValueError, match="needs a statistic"):
        _spec((WEIGHT,), elementwise=False)
    with pytest.raises(ValueError, match="declared twice"):
        _spec((WEIGHT, WEIGHT))


# ---------------------------------------------------------------------------------------------
# The generalized task arithmetic family

# mergekit's registry (merge_methods/registry.py): sparsification, consensus, default normalize / rescale.
MERGEKIT_GTA = {
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False),
    "della": ("della", True, True, True),
    "della_linear": ("della", False, False, True),
}


def test_the_family_table_is_mergekits() -> None:
    assert {m.name: (m.sparsifier, m.consensus, m.normalize, m.rescale) for m in GTA_FAMILY} == MERGEKIT_GTA


@pytest.mark.parametrize("method", GTA_FAMILY, ids=lambda m: m.name)
def test_family_members_are_declared_from_their_row(method: Any) -> None:
    spec = get_method(method.name)
    extra = {"magnitude_outliers": ["gamma"], "della": ["epsilon"]}.get(method.sparsifier, [])
    assert [p.name for p in spec.params] == ["weight", "density", *extra, "normalize", "rescale", "lambda", "int8_mask"]
    assert [p.name for p in spec.model_params] == ["weight", "density", *extra]
    assert spec.param("normalize").default is method.normalize and spec.param("rescale").default is method.rescale
    assert spec.random == (method.sparsifier in ("random", "della"))
    assert (spec.temporaries_base, spec.temporaries_per_model) == method.temporaries
    assert spec.base == "required" and not spec.elementwise and spec.has_statistic


# ---------------------------------------------------------------------------------------------
# Parameter ranges


@pytest.mark.parametrize(
    ("method", "name", "value", "problem"),
    [
        ("ties", "density", 1.5, "must be between 0 and 1, got 1.5"),
        ("ties", "density", -0.2, "must be between 0 and 1, got -0.2"),
        ("ties", "density", math.nan, "must be a finite number, got nan"),
        ("ties", "weight", math.inf, "must be a finite number, got inf"),
        ("ties", "weight", -3, None),
        ("ties", "lambda", -math.inf, "must be a finite number, got -inf"),
        ("ties", "density", 0, None),
        ("ties", "density", 1, None),
        ("breadcrumbs", "gamma", -0.01, "must be between 0 and 1, got -0.01"),
        ("della", "epsilon", -0.1, "must be at least 0 and less than 0.5, got -0.1"),
        ("della", "epsilon", 0.5, "must be at least 0 and less than 0.5, got 0.5"),
        ("slerp", "t", 2.5, "must be between 0 and 1, got 2.5"),
        ("nearswap", "t", -0.001, "must be at least 0, got -0.001"),
        ("sce", "select_topk", 1.2, "must be between 0 and 1, got 1.2"),
        ("karcher", "max_iter", 2.5, "must be a whole number at least 0, got 2.5"),
        ("karcher", "max_iter", 10.0, None),
        ("karcher", "tol", 0.0, "must be greater than 0, got 0.0"),
        ("multislerp", "eps", 0, "must be greater than 0, got 0"),
        ("ram", "epsilon", -1e-5, "must be at least 0, got -1e-05"),
        ("ramplus_tl", "r", -0.1, "must be at least 0, got -0.1"),
        ("passthrough", "scale", None, None),
        ("ties", "normalize", True, None),
        ("ties", "normalize", 0, None),
        ("ties", "normalize", 2, "expected true or false, got 2"),
        ("ties", "normalize", "yes", "expected true or false, got 'yes'"),
        ("ties", "weight", "abc", "expected a number, got 'abc'"),
        ("ties", "weight", True, "expected a number, got True"),
    ],
)
def test_param_check(method: str, name: str, value: Any, problem: str | None) -> None:
    param = get_method(method).param(name)
    assert param is not None
    assert param.check(value) == problem


@pytest.mark.parametrize("name", sorted(REGISTRY.methods))
def test_every_default_is_valid(name: str) -> None:
    spec = REGISTRY.methods[name]
    for p in spec.params:
        if not p.required:
            assert p.check(p.default) is None, f"{name}.{p.name} = {p.default!r}"
    defaults = {p.name: (p.default,) * 2 if p.per_model else p.default for p in spec.params}
    assert spec.check(defaults) == []  # unset required values (REQUIRED) are the planner's to report


def resolved(method: str, **values: Any) -> Mapping[str, Any]:
    """A tensor's resolved parameters: the defaults for two models, with ``values`` on top."""
    spec = get_method(method)
    out: dict[str, Any] = {p.name: (p.default,) * 2 if p.per_model else p.default for p in spec.params}
    return {**out, **values}


@pytest.mark.parametrize(
    ("method", "values", "problems"),
    [
        (
            "ties",
            {"weight": (1.0, 0.5), "density": (0.5, 1.5)},
            ["density of model 'b': must be between 0 and 1, got 1.5"],
        ),
        (
            "ties",
            {"weight": (math.nan, 1.0), "lambda": math.inf},
            ["weight of model 'a': must be a finite number, got nan", "lambda: must be a finite number, got inf"],
        ),
        ("slerp", {"t": 2.5}, ["t: must be between 0 and 1, got 2.5"]),
        # della: density ± epsilon inside (0, 1) wherever the density sparsifies
        (
            "della",
            {"weight": (1.0, 1.0), "density": (0.1, 0.5), "epsilon": (0.15, 0.15)},
            [
                "epsilon of model 'a': density ± epsilon must lie inside (0, 1), got density 0.1 and epsilon 0.15; "
                "use an epsilon below 0.1"
            ],
        ),
        (
            "della_linear",
            {"weight": (1.0, 1.0), "density": (0.9, 0.6), "epsilon": (0.05, 0.4)},
            [
                "epsilon of model 'b': density ± epsilon must lie inside (0, 1), got density 0.6 and epsilon 0.4; "
                "use an epsilon below 0.4"
            ],
        ),
        ("della", {"weight": (1.0, 1.0), "density": (1.0, 0.0), "epsilon": (0.45, 0.45)}, []),  # kept whole, dropped
        (
            "linear",
            {"weight": (1.0, -1.0)},
            ["weight: the weights sum to 0 and normalize divides by their sum; change them or set normalize: false"],
        ),
        ("linear", {"weight": (1.0, -1.0), "normalize": False}, []),
        ("linear", {"weight": (1.0, -0.5)}, []),
        (
            "multislerp",
            {"weight": (0.5, -0.5)},
            [
                "weight: the weights sum to 0 and normalize_weights divides by their sum; change them or set "
                "normalize_weights: false"
            ],
        ),
        ("multislerp", {"weight": (0.5, -0.5), "normalize_weights": False}, []),
        ("task_arithmetic", {"weight": (1.0, -1.0), "normalize": True}, []),  # mergekit skips |Σw| < 1e-8
        ("karcher", {"max_iter": 7.5}, ["max_iter: must be a whole number at least 0, got 7.5"]),
        # a range problem hides the constraints, which assume valid values
        (
            "della",
            {"weight": (1.0, 1.0), "density": (0.1, 2.0)},
            ["density of model 'b': must be between 0 and 1, got 2.0"],
        ),
        ("ties", {"weight": (REQUIRED, 1.0)}, []),  # unset: the planner reports the missing parameter
    ],
)
def test_method_check(method: str, values: dict[str, Any], problems: list[str]) -> None:
    assert get_method(method).check(resolved(method, **values), ["a", "b"]) == problems


def test_method_check_names_models_by_position_without_names() -> None:
    params = resolved("ties", weight=(1.0, 1.0), density=(0.5, -1.0))
    assert get_method("ties").check(params) == ["density of model 1: must be between 0 and 1, got -1.0"]


def test_range_json_schema() -> None:
    assert Range(0.0, 1.0).json_schema() == {"minimum": 0.0, "maximum": 1.0}
    assert Range(0.0, 0.5, high_open=True).json_schema() == {"minimum": 0.0, "exclusiveMaximum": 0.5}
    assert Range(0.0, low_open=True).json_schema() == {"exclusiveMinimum": 0.0}
    assert Range(0.0, whole=True).json_schema() == {"minimum": 0.0, "multipleOf": 1}
    assert Range().json_schema() == {}
