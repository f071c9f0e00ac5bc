"""The recipe JSON schema: the committed file is what the code generates, the shipped recipes
validate against it and load, and the schema rejects what the loader rejects."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from mergekitlite.cli import main
from mergekitlite.errors import RecipeError
from mergekitlite.recipe import load_recipes, parse_recipes, recipe_json_schema

REPO = Path(__file__).resolve().parent.parent
SCHEMA_FILE = REPO / "schemas" / "recipe.schema.json"
RECIPES = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes").glob("*.yml"))


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def test_schema_file_is_up_to_date():
    expected = json.dumps(recipe_json_schema(), indent=2, ensure_ascii=False) + "\n"
    assert SCHEMA_FILE.read_text(encoding="utf-8") == expected, "run `mergekitlite schema` to regenerate it"


def test_schema_command_check(tmp_path, capsys):
    target = tmp_path / "schema.json"
    assert main(["schema", "--output", str(target), "--check"]) == 1
    assert main(["schema", "--output", str(target)]) == 0
    assert json.loads(target.read_text()) == recipe_json_schema()
    assert main(["schema", "--output", str(target), "--check"]) == 0


def test_schema_is_a_valid_draft_2020_12_schema(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_every_shipped_recipe_validates_and_loads(schema):
    validator = jsonschema.Draft202012Validator(schema)
    checked = 0
    for path in RECIPES:
        text = path.read_text(encoding="utf-8")
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        assert docs, f"{path} is empty"
        for i, doc in enumerate(docs):
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
            assert not errors, f"{path.name} document {i + 1}: " + "; ".join(
                f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors
            )
        steps = load_recipes(path)
        assert len(steps) == len(docs)
        checked += 1
    assert checked == len(RECIPES)  # an empty recipes/ folder passes, having checked nothing


# Recipes the schema rejects, and what the loader names when it rejects them (keys mergekit ignores: with strict).
A = {"model": "a", "parameters": {"weight": 1}}
INVALID = [
    ({"merge_method": "linear", "models": [A], "modles": []}, "unknown top-level key", "modles"),
    ({"models": [A]}, "merge_method missing", "merge_method"),
    ({"merge_method": "linear", "models": [{**A, "paramters": {}}]}, "unknown model key", "paramters"),
    (
        {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"filtr": "x", "value": 1}}}]},
        "unknown rule key",
        "filtr",
    ),
    ({"merge_method": "linear", "models": [A], "dtype": "int8"}, "unknown dtype", "int8"),
    ({"merge_method": "linear", "models": [A], "compute_dtype": "float8"}, "unknown compute dtype", "float8"),
]


@pytest.mark.parametrize(("doc", "why", "needle"), INVALID)
def test_schema_rejects_invalid_recipes(schema, doc, why, needle):
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(doc)), why


@pytest.mark.parametrize(("doc", "why", "needle"), INVALID)
def test_the_strict_loader_rejects_what_the_schema_rejects(doc, why, needle):
    with pytest.raises(RecipeError) as info:
        parse_recipes(yaml.safe_dump(doc), strict=True)
    assert [p for p in info.value.problems if needle in p], (why, info.value.problems)


def test_schema_accepts_mergekit_forms(schema):
    doc = {
        "merge_method": "task_arithmetic",
        "base_model": "org/base",
        "models": [
            {"model": "org/a", "parameters": {"weight": [0, 0.5, 1]}},
            {"model": "org/b", "parameters": {"weight": [{"filter": "self_attn", "value": 0.5}, {"value": 1}]}},
        ],
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "bfloat16",
        "tokenizer_source": "base",
    }
    jsonschema.validate(doc, schema)
    slices = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2]}]},
            {"sources": [{"model": "b", "layer_range": [1, 3]}]},
        ],
        "dtype": "float16",
    }
    jsonschema.validate(slices, schema)


def _ties(**density_at: object) -> dict:
    """A ties recipe with ``density`` at one place: models, parameters, slices or a rule of another method."""
    doc: dict = {"merge_method": "ties", "base_model": "base", "models": [{"model": "a", "parameters": {"weight": 1}}]}
    if "models" in density_at:
        doc["models"][0]["parameters"]["density"] = density_at["models"]
    if "parameters" in density_at:
        doc["parameters"] = {"density": density_at["parameters"]}
    if "rule" in density_at:
        doc["rules"] = [{"match": "*mlp*", "method": "dare_linear", "parameters": {"density": density_at["rule"]}}]
    if "slerp_rule" in density_at:
        doc["rules"] = [{"match": "*mlp*", "method": "slerp", "parameters": {"t": density_at["slerp_rule"]}}]
    return doc


@pytest.mark.parametrize(
    ("doc", "valid"),
    [
        (_ties(models=0.5), True),
        (_ties(models=1.5), False),
        (_ties(models=-0.2), False),
        (_ties(models=[0, 0.5, 1]), True),
        (_ties(models=[0.2, 1.5]), False),
        (_ties(parameters=[{"filter": "mlp", "value": 2}, {"value": 0.5}]), False),
        (_ties(parameters={"filter": "mlp", "value": [0.5, -1]}), False),
        (_ties(parameters=[{"filter": "mlp", "value": 0.3}, {"value": [0.5, 1]}]), True),
        (_ties(rule=1.5), False),
        (_ties(rule=0.5), True),
        (_ties(slerp_rule=2.5), False),
        ({**_ties(models=1.5), "merge_method": "linear"}, True),  # linear takes no density: not bounded
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]}],
                "parameters": {"t": [0, 1.5]},
            },
            False,
        ),
    ],
)
def test_schema_bounds_parameters_by_method(schema, doc, valid):
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
    assert (not errors) == valid, [e.message for e in errors]
