"""Numbers in recipes: non-finite ones are errors wherever a number is accepted; a required
per-model parameter (weight) is needed in the models: and the slices: form alike."""

from __future__ import annotations

import pytest
from builders import text_position as at

from mergekitlite import parse_recipe
from mergekitlite.cli import main
from mergekitlite.errors import RecipeError


def problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="r.yaml")
    return info.value.problems


HEAD = "merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n  - model: org/a\n    parameters:\n"
INF_HINT = " (numbers beyond ±1.8e308 are infinite)"

# How each non-finite number is written in YAML, and how the error shows it.
FORMS = {
    ".nan": ".nan",
    ".NaN": ".nan",
    ".inf": f".inf{INF_HINT}",
    "+.inf": f".inf{INF_HINT}",
    "-.inf": f"-.inf{INF_HINT}",
    "-.Inf": f"-.inf{INF_HINT}",
    "1.0e+400": f".inf{INF_HINT}",  # a YAML float too large for a double
    "1e400": f".inf{INF_HINT}",  # a string to YAML 1.1, read as a number like mergekit's pydantic does
    "-2e999": f"-.inf{INF_HINT}",
}

# Where a number is accepted: (recipe text with {x} for the number, the path the error names)
PLACES = {
    "scalar": (HEAD + "      weight: {x}\n", "models[0].parameters.weight"),
    "gradient point": (HEAD + "      weight: [0.5, {x}, 1]\n", "models[0].parameters.weight[1]"),
    "filter value": (
        HEAD + "      weight:\n        - filter: mlp\n          value: {x}\n        - value: 1\n",
        "models[0].parameters.weight[0].value",
    ),
    "filtered gradient": (
        HEAD + "      weight: [{{filter: mlp, value: [{x}, 1]}}, {{value: 1}}]\n",
        "models[0].parameters.weight[0].value[0]",
    ),
    "global parameter": (HEAD + "      weight: 1\nparameters:\n  lambda: {x}\n", "parameters.lambda"),
    "slice parameter": (
        "merge_method: linear\nslices:\n  - sources:\n      - model: org/a\n        layer_range: [0, 2]\n"
        "        parameters: {{weight: {x}}}\n",
        "slices[0].sources[0].parameters.weight",
    ),
    "residual_weight": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: org/a\n        layer_range: [0, 2]\n"
        "    residual_weight: {x}\n",
        "slices[0].residual_weight",
    ),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("place", list(PLACES))
def test_non_finite_numbers_are_errors(place, form):
    template, path = PLACES[place]
    text = template.format(x=form)
    assert problems(text) == [f"r.yaml:{at(text, form)}: {path}: expected a finite number, got {FORMS[form]}"]


@pytest.mark.parametrize(("written", "shown"), [('"nan"', "'nan'"), ('"inf"', "'inf'"), ('"-Infinity"', "'-Infinity'")])
def test_non_finite_strings_in_float_fields_are_errors(written, shown):
    """A quoted number in a float field is read as pydantic reads it (as mergekit does), and must be finite too."""
    text = PLACES["residual_weight"][0].format(x=written)
    assert problems(text) == [
        f"r.yaml:{at(text, written)}: slices[0].residual_weight: input should be a finite number; got {shown}"
    ]


@pytest.mark.parametrize(("written", "value"), [("5e-1", 0.5), ('"5e-1"', 0.5), ("1.5e+2", 150.0), ("-2E-1", -0.2)])
def test_numbers_mergekit_reads_still_work(written, value):
    r = parse_recipe(HEAD + f"      weight: {written}\n").recipe
    assert r.models[0].parameters["weight"] == value


def test_non_finite_through_validate(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + "      weight: .nan\n")
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:6:15: models[0].parameters.weight: expected a finite number, got .nan"
    ]


# ---------------------------------------------------------------- a missing weight, in both forms
MODELS_FORM = """\
merge_method: {method}
base_model: org/base
models:
  - model: org/base
  - model: org/a
    parameters: {{weight: 0.5}}
  - model: org/b
"""

SLICES_FORM = """\
merge_method: {method}
base_model: org/base
slices:
  - sources:
      - model: org/base
        layer_range: [0, 2]
      - model: org/a
        layer_range: [0, 2]
        parameters: {{weight: 0.5}}
      - model: org/b
        layer_range: [0, 2]
"""


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "della"])
@pytest.mark.parametrize(
    ("form", "path"), [(MODELS_FORM, "models[2].model"), (SLICES_FORM, "slices[0].sources[2].model")]
)
def test_missing_weight_is_an_error_in_both_forms(form, path, method):
    """mergekit declares weight required for these methods and stops with 'Missing required
    parameter weight' for any input but the base, whatever the form: so do we, the same way."""
    text = form.format(method=method)
    where = at(text, "org/b\n")
    assert problems(text) == [f"r.yaml:{where}: {path}: {method} needs parameters.weight for this model"]


@pytest.mark.parametrize("form", [MODELS_FORM, SLICES_FORM])
def test_a_global_weight_satisfies_every_input(form):
    parse_recipe(form.format(method="task_arithmetic") + "parameters: {weight: 1.0}\n")


def test_a_slice_weight_satisfies_its_sources():
    text = SLICES_FORM.format(method="task_arithmetic") + "    parameters: {weight: 1.0}\n"
    assert parse_recipe(text).recipe.slices[0].parameters == {"weight": 1.0}


def test_linear_needs_a_weight_for_every_model_in_both_forms():
    """linear takes no base: every input needs a weight, the model named base_model included."""
    models = "merge_method: linear\nbase_model: org/base\nmodels:\n  - model: org/base\n  - model: org/a\n"
    slices = (
        "merge_method: linear\nbase_model: org/base\nslices:\n  - sources:\n"
        "      - model: org/base\n        layer_range: [0, 2]\n"
        "      - {model: org/a, layer_range: [0, 2], parameters: {weight: 1}}\n"
    )
    assert problems(models + "    parameters: {weight: 1}\n") == [
        "r.yaml:4:12: models[0].model: linear needs parameters.weight for this model"
    ]
    assert problems(slices) == [
        "r.yaml:5:16: slices[0].sources[0].model: linear needs parameters.weight for this model"
    ]


def test_a_non_finite_number_under_an_ignored_key_is_only_the_key_warning():
    """mergekit never reads it: the key's warning, and no error for what it holds."""
    text = HEAD + "      weight: 1\n    wieghts: [.nan]\n"
    assert parse_recipe(text, source="r.yaml").warnings == (
        "r.yaml:7:5: models[0].wieghts: unknown key; expected one of: model, parameters; mergekit ignores this key",
    )
