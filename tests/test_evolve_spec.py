"""The search spec: validation with file:line:col lines (every problem at once, the template checked by the
recipe loader), the JSON schema, and turning a trial's values back into an ordinary recipe."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from mergekitlite.cli import main
from mergekitlite.errors import RecipeError
from mergekitlite.evolve.space import SearchSpace, recipe_yaml
from mergekitlite.evolve.spec import load_search, parse_search, search_json_schema
from mergekitlite.recipe import parse_recipe

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "schemas" / "search.schema.json"
DEMO_SPEC = ROOT / "demo" / "evolve" / "search.yaml"
TEXT = str(ROOT / "demo" / "data" / "continued_facts.txt")

GOOD = f"""
name: s1
template:
  merge_method: {{search: choice, options: [task_arithmetic, ties], init: ties}}
  base_model: org/base
  models:
    - model: org/a
      parameters:
        weight: {{search: gradient, points: 3, low: 0, high: 2, init: [1, 1.5, 2], name: a.w}}
        density: {{search: float, low: 0.1, high: 1.0}}
    - model: org/b
      parameters:
        weight:
          - {{filter: self_attn, value: {{search: float, low: 0, high: 1, name: b.attn}}}}
          - {{value: 0.5}}
  dtype: bfloat16
objective:
  - {{metric: perplexity, text: {TEXT}}}
budget: {{trials: 5}}
"""


def spec_problems(text: str, source: str = "s.yaml") -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_search(textwrap.dedent(text).lstrip("\n"), source=source)
    return info.value.problems


def test_free_parameters_become_dimensions_and_recipes():
    loaded = parse_search(textwrap.dedent(GOOD).lstrip("\n"), "s.yaml")
    space = SearchSpace(loaded)
    names = [d.name for d in space.dimensions]
    assert names == [
        "merge_method",
        "a.w[0]",
        "a.w[1]",
        "a.w[2]",
        "models[0].parameters.density",
        "b.attn",
    ]
    assert space.baseline() == {
        "merge_method": "ties",
        "a.w[0]": 1,
        "a.w[1]": 1.5,
        "a.w[2]": 2,
        "models[0].parameters.density": pytest.approx(0.55),
        "b.attn": 0.5,
    }
    params = {"merge_method": "task_arithmetic", "a.w[0]": 0.1, "a.w[1]": 0.2, "a.w[2]": 0.3}
    params |= {"models[0].parameters.density": 0.7, "b.attn": 0.25}
    data = space.recipe_data(params, {"org/a": "/abs/a"})
    assert data["merge_method"] == "task_arithmetic"
    assert data["models"][0] == {"model": "/abs/a", "parameters": {"weight": [0.1, 0.2, 0.3], "density": 0.7}}
    assert data["models"][1]["parameters"]["weight"] == [{"filter": "self_attn", "value": 0.25}, {"value": 0.5}]
    assert data["base_model"] == "org/base"  # not in the renaming map: a hub id stays as written
    text = recipe_yaml(space.recipe_data(params), "a comment\nsecond line")
    assert text.startswith("# a comment\n# second line\nmerge_method: task_arithmetic\n")
    assert "weight: [0.1, 0.2, 0.3]" in text  # gradients on one line, as people write them
    recipe = parse_recipe(text).recipe  # an ordinary recipe, that the loader accepts
    assert recipe.models[0].parameters["weight"] == [0.1, 0.2, 0.3]
    assert recipe.models[1].parameters["weight"][0].value == 0.25


def test_every_problem_at_once_with_positions():
    text = f"""
    name: bad name
    template:
      merge_method: task_arithmetic
      base_model: org/base
      models:
        - model: org/a
          parameters:
            weight: {{search: float, low: 2, high: 1}}
            wieght: 1.0
        - model: org/b
          paramters: {{weight: 1.0}}
    objective:
      - {{metric: perplexity, txt: {TEXT}}}
      - {{metric: qa, path: /nowhere/qa.jsonl}}
    budget: {{trails: 3}}
    """
    problems = spec_problems(text)
    assert problems[0] == "s.yaml:1:7: name: string should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]*$'; got 'bad name'"
    assert "s.yaml:8:17: template.models[0].parameters.weight: low (2) must be below high (1)" in problems
    assert "s.yaml:13:5: objective[0].text: required key is missing" in problems
    assert "s.yaml:13:26: objective[0].txt: unknown key (did you mean 'text'?)" in problems
    assert problems[4].startswith("s.yaml:14:24: objective[1].path: no such file or folder: /nowhere/qa.jsonl")
    assert "s.yaml:15:10: budget.trails: unknown key (did you mean 'trials'?)" in problems
    # The template's own mistakes (wieght, paramters) are the recipe loader's to find, once the rest is valid.
    assert len(problems) == 6, problems


def test_template_problems_come_from_the_recipe_loader_at_their_place():
    text = f"""
    name: s
    template:
      merge_method: {{search: choice, options: [task_arithmetic, slerp]}}
      base_model: org/base
      models:
        - model: org/a
          parameters:
            wieght: {{search: float, low: 0, high: 1}}
        - model: org/b
          paramters: {{weight: 1.0}}
    objective:
      - {{metric: perplexity, text: {TEXT}}}
    budget: {{trials: 3}}
    """
    problems = spec_problems(text)
    # As for a recipe: the errors (weights missing, too many models for slerp), with the warnings about keys
    # mergekit ignores that explain them, at their places, for each method a choice may pick.
    assert problems == [
        "s.yaml:6:14: models[0].model: task_arithmetic needs parameters.weight for this model "
        "(with merge_method task_arithmetic)",
        "s.yaml:8:9: models[0].parameters.wieght: unknown parameter for task_arithmetic (did you mean 'weight'?); "
        "it takes: lambda, normalize, weight; mergekit ignores it (with merge_method task_arithmetic)",
        "s.yaml:9:14: models[1].model: task_arithmetic needs parameters.weight for this model "
        "(with merge_method task_arithmetic)",
        "s.yaml:10:7: models[1].paramters: unknown key (did you mean 'parameters'?); mergekit ignores this key: "
        "no parameters are set here (with merge_method task_arithmetic)",
        "s.yaml:6:5: models: slerp takes at most 1 model(s), got 2 (with merge_method slerp)",
        "s.yaml:8:9: models[0].parameters.wieght: unknown parameter for slerp (did you mean 'weight'?); it takes: t; "
        "mergekit ignores it (with merge_method slerp)",
        "s.yaml:10:7: models[1].paramters: unknown key (did you mean 'parameters'?); mergekit ignores this key: "
        "no parameters are set here (with merge_method slerp)",
    ]


def test_missing_files_duplicate_names_and_no_free_parameter():
    text = f"""
    name: s
    template:
      merge_method: linear
      models:
        - model: org/a
          parameters: {{weight: {{search: float, low: 0, high: 1, name: w}}}}
        - model: org/b
          parameters: {{weight: {{search: float, low: 0, high: 1, name: w}}}}
    objective:
      - {{metric: perplexity, text: {TEXT}}}
      - {{metric: perplexity, text: {TEXT}}}
      - {{metric: eos_rate, prompts: missing.yaml}}
    budget: {{wall_time: 10 minutes}}
    """
    problems = spec_problems(text)
    assert problems[0] == (
        "s.yaml:8:28: template.models[1].parameters.weight: parameter name 'w' is used twice "
        "(also at models[0].parameters.weight)"
    )
    assert problems[1] == (
        "s.yaml:11:5: objective[1]: two terms are named 'perplexity:continued_facts': give one a distinct 'name'"
    )
    assert problems[2].startswith("s.yaml:12:33: objective[2].prompts: no such file or folder: missing.yaml")
    assert problems[3] == (
        "s.yaml:13:21: budget.wall_time: not a duration: '10 minutes' (expected seconds, or e.g. 90s, 10m, 2h)"
    )
    assert len(problems) == 4
    none_free = GOOD.replace("{search: float, low: 0.1, high: 1.0}", "0.5").replace(
        "{search: gradient, points: 3, low: 0, high: 2, init: [1, 1.5, 2], name: a.w}", "1.0"
    )
    none_free = none_free.replace("{search: float, low: 0, high: 1, name: b.attn}", "0.5")
    none_free = none_free.replace("{search: choice, options: [task_arithmetic, ties], init: ties}", "ties")
    assert spec_problems(none_free) == [
        "s.yaml:2:1: template: no free parameters: write e.g. weight: {search: float, low: 0, high: 2}"
    ]


def test_load_search_file_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"nowhere\.yaml: no such search spec"):
        load_search(tmp_path / "nowhere.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"bad\.yaml:2:1: invalid YAML"):
        load_search(bad)


def test_schema_file_is_up_to_date():
    expected = json.dumps(search_json_schema(), indent=2, ensure_ascii=False) + "\n"
    assert SCHEMA_FILE.read_text(encoding="utf-8") == expected, "run `mergekitlite evolve-schema` to regenerate it"


def test_schema_command_check(tmp_path):
    target = tmp_path / "search.schema.json"
    assert main(["evolve-schema", "--output", str(target), "--check"]) == 1
    assert main(["evolve-schema", "--output", str(target)]) == 0
    assert main(["evolve-schema", "--output", str(target), "--check"]) == 0
    assert json.loads(target.read_text()) == search_json_schema()


def test_schema_accepts_the_demo_spec_and_rejects_typos():
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    doc = yaml.safe_load(DEMO_SPEC.read_text(encoding="utf-8"))
    jsonschema.validate(doc, schema)
    load_search(DEMO_SPEC)  # and the loader accepts it
    for broken in (
        {**doc, "budgett": {"trials": 1}},
        {**doc, "objective": [{"metric": "perplexity"}]},
        {**doc, "objective": [{"metric": "bleu", "text": "x"}]},
    ):
        assert list(jsonschema.Draft202012Validator(schema).iter_errors(broken)), broken
