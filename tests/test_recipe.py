"""Recipe loading: mergekit's YAML, validation with file:line:col messages, every problem at once,
and compatibility with published mergekit configs (which must validate and merge unchanged)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import builders
import pytest
import torch
from builders import assert_bitwise, load_tensors, read_config, ref_linear, ref_task_arithmetic

from mergekitlite import MergeOptions, load_recipe, parse_recipe, run_merge
from mergekitlite.errors import RecipeError


def problems_of(text: str, source: str = "r.yaml", *, strict: bool = False) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(textwrap.dedent(text).lstrip("\n"), source=source, strict=strict)
    return info.value.problems


def warnings_of(text: str, source: str = "r.yaml") -> list[str]:
    return list(parse_recipe(textwrap.dedent(text).lstrip("\n"), source=source).warnings)


def position(text: str, needle: str, occurrence: int = 1, offset: int = 0) -> str:
    """'line:col' (1-based) of the ``occurrence``-th ``needle`` in the dedented text, plus ``offset`` columns."""
    return builders.text_position(textwrap.dedent(text).lstrip("\n"), needle, occurrence, offset)


GOOD = """
merge_method: task_arithmetic
base_model: org/base
models:
  - model: org/a
    parameters:
      weight: 1.0
  - model: ./local/b
    parameters:
      weight: [0.0, 0.5, 1.0]
parameters:
  normalize: true
  lambda: 0.8
dtype: bf16
out_dtype: torch.float16
tokenizer_source: org/a
"""


def test_valid_recipe_fields():
    loaded = parse_recipe(textwrap.dedent(GOOD))
    r = loaded.recipe
    assert r.merge_method == "task_arithmetic"
    assert r.base_model == "org/base"
    assert [m.model for m in r.models] == ["org/a", "./local/b"]
    assert r.models[1].parameters["weight"] == [0.0, 0.5, 1.0]
    assert r.parameters["normalize"] is True and r.parameters["lambda"] == 0.8
    assert r.dtype == "bfloat16" and r.out_dtype == "float16"
    assert r.compute_dtype == "float32"
    assert r.referenced_models() == ["org/base", "org/a", "./local/b"]
    assert loaded.warnings == ()


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("bf16", "bfloat16"),
        ("fp16", "float16"),
        ("half", "float16"),
        ("torch.bfloat16", "bfloat16"),
        ("float32", "float32"),
        ("fp32", "float32"),
        ("float", "float32"),
    ],
)
def test_dtype_aliases(given, normal):
    text = f"merge_method: linear\nmodels:\n  - model: a\n    parameters: {{weight: 1}}\ndtype: {given}\n"
    r = parse_recipe(text).recipe
    assert r.dtype == normal


def test_typo_at_top_level():
    """mergekit ignores the key, so the recipe has no models: an error, with the key's warning as the reason."""
    text = """
    merge_method: linear
    modles:
      - model: a
    """
    ps = problems_of(text)
    assert ps == [
        f"r.yaml:{position(text, 'linear')}: merge_method: "
        "the recipe needs a 'models' list (or 'slices' or 'modules') naming what to merge",
        f"r.yaml:{position(text, 'modles')}: modles: unknown key (did you mean 'models'?); mergekit ignores this key",
    ]


def test_typo_in_a_model_entry():
    """Without its parameters, model b has no weight: the error, and the warning that explains it."""
    text = """
    merge_method: task_arithmetic
    base_model: base
    models:
      - model: a
        parameters:
          weight: 1.0
      - model: b
        paramters:
          weight: 1.0
    """
    ps = problems_of(text)
    assert ps == [
        f"r.yaml:{position(text, '- model: b', offset=9)}: models[1].model: "
        "task_arithmetic needs parameters.weight for this model",
        f"r.yaml:{position(text, 'paramters')}: models[1].paramters: unknown key (did you mean 'parameters'?); "
        "mergekit ignores this key: no parameters are set here",
    ]


def test_typo_in_a_filter_rule():
    """mergekit reads the rule without its misspelled filter: 0.5 for every tensor. So do we, and say so."""
    text = """
    merge_method: task_arithmetic
    base_model: base
    models:
      - model: a
        parameters:
          weight:
            - fliter: self_attn
              value: 0.5
            - value: 1.0
    """
    loaded = parse_recipe(textwrap.dedent(text).lstrip("\n"), source="r.yaml")
    assert loaded.warnings == (
        f"r.yaml:{position(text, 'fliter')}: models[0].parameters.weight[0].fliter: unknown key (did you mean "
        "'filter'?); mergekit ignores this key: this rule has no filter, so it applies to every tensor",
    )
    assert loaded.recipe.models[0].parameters["weight"][0].filter is None
    assert loaded.recipe.models[0].parameters["weight"][0].value == 0.5


def test_unknown_parameter_name_is_a_warning_with_suggestion():
    """mergekit reads only the parameters a method declares; a misspelled one is ignored (here the
    weight is then missing: an error, listed with the warning that explains it)."""
    text = """
    merge_method: task_arithmetic
    base_model: base
    models:
      - model: a
        parameters:
          wieght: 1.0
    """
    warning = (
        f"r.yaml:{position(text, 'wieght')}: models[0].parameters.wieght: unknown parameter for task_arithmetic "
        "(did you mean 'weight'?); it takes: lambda, normalize, weight; mergekit ignores it"
    )
    assert warning in problems_of(text)
    assert warnings_of(text.replace("wieght: 1.0", "wieght: 1.0\n          weight: 1.0")) == [warning]


def test_parameter_of_another_method_is_a_warning():
    text = GOOD.replace("  lambda: 0.8\n", "  lambda: 0.8\n  int8_mask: true\n  density: 0.5\n")
    loaded = parse_recipe(textwrap.dedent(text))
    assert any("int8_mask" in w for w in loaded.warnings), loaded.warnings
    assert any("density" in w for w in loaded.warnings), loaded.warnings


def test_unknown_method_with_suggestion():
    text = GOOD.replace("task_arithmetic", "task_arithmetc")
    ps = problems_of(text)
    assert any(
        f"r.yaml:{position(text, 'task_arithmetc')}: merge_method: unknown merge method 'task_arithmetc'" in p
        and "did you mean 'task_arithmetic'?" in p
        for p in ps
    ), ps


def test_required_keys_and_weights():
    ps = problems_of("base_model: x\nmodels:\n  - model: a\n")
    assert any("merge_method" in p and "required" in p for p in ps), ps
    text = """
    merge_method: task_arithmetic
    models:
      - model: a
        parameters: {weight: 1.0}
      - model: b
    """
    ps = problems_of(text)
    assert any("base_model" in p for p in ps), ps
    where = position(text, "model: b", offset=len("model: "))
    assert any(p.startswith(f"r.yaml:{where}: models[1].model: task_arithmetic needs parameters.weight") for p in ps), (
        ps
    )
    # A global weight satisfies every model.
    parse_recipe("merge_method: task_arithmetic\nbase_model: x\nmodels:\n  - model: a\nparameters:\n  weight: 1.0\n")


def test_wrong_types():
    text = """
    merge_method: linear
    models:
      - model: a
        parameters:
          weight: {value: 1}
      - model: 3
    dtype: int8
    """
    ps = problems_of(text)
    assert any(p.startswith(f"r.yaml:{position(text, 'int8')}: dtype:") and "int8" in p for p in ps), ps
    assert any(p.startswith(f"r.yaml:{position(text, '3')}: models[1].model:") for p in ps), ps


def test_duplicate_key_and_syntax_error():
    """The later of two equal keys wins, in YAML loaders and so in mergekit: a warning, not an error."""
    text = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\ndtype: bfloat16\ndtype: float16\n"
    loaded = parse_recipe(text, source="r.yaml")
    assert loaded.recipe.dtype == "float16"
    assert loaded.warnings == (
        "r.yaml:6:1: dtype: duplicate key (also on line 5); mergekit, as any YAML loader, uses this later value "
        "and ignores the one on line 5",
    )
    ps = problems_of("merge_method: linear\nmodels: [a, b\n")
    assert len(ps) == 1 and ps[0].startswith("r.yaml:3:1: invalid YAML"), ps
    ps = problems_of("merge_method: linear\nmodels:\n  - model: a\n   parameters: {}\n")
    assert len(ps) == 1 and ps[0].startswith("r.yaml:4:4: invalid YAML"), ps


def test_every_problem_at_once():
    text = """
    merge_method: task_arithmetic
    base_model: base
    models:
      - model: a
        parameters:
          wieght: 1.0
      - model: b
        paramters:
          weight: 1.0
    dtype: bfloat17
    tokenizer_sourse: a
    """
    ps = problems_of(text)
    assert len(ps) >= 4, ps
    for needle in ("wieght", "paramters", "bfloat17", "tokenizer_sourse"):
        assert any(p.startswith(f"r.yaml:{position(text, needle)}:") for p in ps), (needle, ps)
    # sorted by position in the file
    lines = [tuple(int(x) for x in p.split(":")[1:3]) for p in ps]
    assert lines == sorted(lines)


def test_invalid_regex_filter():
    text = """
    merge_method: task_arithmetic
    base_model: base
    models:
      - model: a
        parameters:
          weight:
            - filter: 're:(unclosed'
              value: 1.0
    """
    ps = problems_of(text)
    assert any("models[0].parameters.weight[0].filter: invalid regular expression" in p for p in ps), ps


def test_a_malformed_lora_reference_is_explained():
    ps = problems_of("merge_method: linear\nmodels:\n  - model: org/model+a+b\n    parameters: {weight: 1}\n")
    assert any("'org/model+a+b': expected 'model+adapter'" in p for p in ps), ps


def test_rules_need_take_or_method():
    text = """
    merge_method: linear
    models:
      - model: a
        parameters: {weight: 1}
    rules:
      - match: embed
      - match: norm
        take: a
        method: linear
      - match: lm_head
        method: linaer
    """
    ps = problems_of(text)
    assert sum("exactly one of 'take'" in p for p in ps) == 2, ps
    assert any("rules[2].method: unknown merge method 'linaer'" in p for p in ps), ps


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00merge")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(tmp_path / "bin.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(RecipeError, match="empty"):
        load_recipe(tmp_path / "empty.yaml")
    (tmp_path / "list.yaml").write_text("- merge_method: linear\n")
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(tmp_path / "list.yaml")


# ---------------------------------------------------------------- mergekit YAML compatibility
# Recipes in the exact style of published mergekit configs (hand-written examples from mergekit's
# README and the ``mergekit_config.yml`` files mergekit writes next to merged models), with the
# hub ids replaced by tiny local models.


def _published(tmp_path: Path, template: str, fam: dict[str, Path]) -> Path:
    text = textwrap.dedent(template).lstrip("\n").format(**{k: str(v) for k, v in fam.items()})
    p = tmp_path / "mergekit_config.yml"
    p.write_text(text)
    return p


TASK_ARITHMETIC_README = """
models:
  - model: {a}
    parameters:
      weight: 0.5
  - model: {b}
    parameters:
      weight: 0.5
merge_method: task_arithmetic
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
tokenizer_source: base
"""

# What mergekit writes into mergekit_config.yml when it builds the config itself (mergekit-evolve,
# the Python API; mergekit 0.0.4 - 0.1.x): keys sorted, layer slices with the base model as a
# source, and numbers where booleans were meant (its parameter values were typed float).
TASK_ARITHMETIC_WRITTEN = """
base_model: {base}
dtype: bfloat16
merge_method: task_arithmetic
parameters:
  int8_mask: 1.0
  normalize: 1.0
slices:
- sources:
  - layer_range: [0, 2]
    model: {base}
  - layer_range: [0, 2]
    model: {a}
    parameters:
      weight: 0.5
  - layer_range: [0, 2]
    model: {b}
    parameters:
      weight: 0.25
- sources:
  - layer_range: [2, 3]
    model: {base}
  - layer_range: [2, 3]
    model: {a}
    parameters:
      weight: 0.75
  - layer_range: [2, 3]
    model: {b}
    parameters:
      weight: 0.5
"""


def _written_weights(name: str) -> list[float]:
    """Per-tensor weights of TASK_ARITHMETIC_WRITTEN: layers 0-1 from slice 0, layer 2 from slice 1;
    embeddings use the first slice's parameters, the final norm and lm_head the last slice's."""
    layer = builders.layer_of(name)
    first = layer in (0, 1) or (layer is None and "embed" in name)
    return [0.5, 0.25] if first else [0.75, 0.5]


LINEAR_README = """
models:
  - model: {base}
    parameters:
      weight: 1.0
  - model: {a}
    parameters:
      weight: 0.3
  - model: {b}
    parameters:
      weight: 0.5
merge_method: linear
dtype: bfloat16
"""


@pytest.mark.parametrize("template", [TASK_ARITHMETIC_README, TASK_ARITHMETIC_WRITTEN], ids=["readme", "written"])
def test_published_task_arithmetic(llama_family, tmp_path, template):
    recipe = _published(tmp_path, template, llama_family)
    loaded = load_recipe(recipe)
    assert any("int8_mask" in w for w in loaded.warnings), "int8_mask should be a warning for task_arithmetic"
    result = run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False))
    assert result.plan.tokenizer_donor == str(llama_family["base"])
    out = load_tensors(tmp_path / "out")
    base, a, b = (load_tensors(llama_family[k]) for k in ("base", "a", "b"))
    assert set(out) == set(base)
    for name, t in out.items():
        weights = _written_weights(name) if template is TASK_ARITHMETIC_WRITTEN else [0.5, 0.5]
        exp = ref_task_arithmetic(base[name], [a[name], b[name]], weights, normalize=True)
        assert_bitwise(t, exp.to(torch.bfloat16), name)
    assert read_config(tmp_path / "out")["num_hidden_layers"] == 3
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == recipe.read_text()


def test_published_linear(llama_family, tmp_path):
    recipe = _published(tmp_path, LINEAR_README, llama_family)
    run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False))
    out = load_tensors(tmp_path / "out")
    ins = [load_tensors(llama_family[k]) for k in ("base", "a", "b")]
    for name, t in out.items():
        assert_bitwise(t, ref_linear([m[name] for m in ins], [1.0, 0.3, 0.5]).to(torch.bfloat16), name)


PASSTHROUGH_FRANKEN = """
slices:
  - sources:
    - model: {a}
      layer_range: [0, 2]
  - sources:
    - model: {b}
      layer_range: [1, 3]
merge_method: passthrough
dtype: bfloat16
"""


def test_published_passthrough_frankenmerge(llama_family, tmp_path):
    """Layers 0-1 of a, then layers 1-2 of b: a 4-layer model; tensors copied bit for bit."""
    recipe = _published(tmp_path, PASSTHROUGH_FRANKEN, llama_family)
    run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False))
    out = load_tensors(tmp_path / "out")
    a, b = load_tensors(llama_family["a"]), load_tensors(llama_family["b"])
    layer_names = sorted({n.split(".", 3)[3] for n in a if n.startswith("model.layers.0.")})
    expected = {}
    for k, (src, i) in enumerate([(a, 0), (a, 1), (b, 1), (b, 2)]):
        for rest in layer_names:
            expected[f"model.layers.{k}.{rest}"] = src[f"model.layers.{i}.{rest}"]
    expected["model.embed_tokens.weight"] = a["model.embed_tokens.weight"]
    expected["model.norm.weight"] = b["model.norm.weight"]
    expected["lm_head.weight"] = b["lm_head.weight"]
    assert set(out) == set(expected)
    for name, t in expected.items():
        assert_bitwise(out[name], t, name)
    assert read_config(tmp_path / "out")["num_hidden_layers"] == 4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()


def test_mergekit_style_gradient_and_filters(llama_tied_family, tmp_path):
    """mergekit's README parameter forms: gradients of several points and filter lists with a
    fallback, on a 5-layer model (t = 0, .25, .5, .75, 1 → gradient points interpolated)."""
    template = """
    models:
      - model: {a}
        parameters:
          weight: [1, 0.5, 0.25]
      - model: {b}
        parameters:
          weight:
            - filter: mlp
              value: [0, 0.5]
            - filter: self_attn
              value: 0.75
            - value: 0.125
    merge_method: task_arithmetic
    base_model: {base}
    dtype: bfloat16
    """
    fam = llama_tied_family
    recipe = _published(tmp_path, template, fam)
    run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False))
    out = load_tensors(tmp_path / "out")
    base, a, b = (load_tensors(fam[k]) for k in ("base", "a", "b"))
    settings = [
        [1, 0.5, 0.25],
        [{"filter": "mlp", "value": [0, 0.5]}, {"filter": "self_attn", "value": 0.75}, {"value": 0.125}],
    ]
    seen_weights = set()
    for name, t in out.items():
        w = [builders.expected_value(s, name, 5) for s in settings]
        seen_weights.add(tuple(w))
        assert_bitwise(t, ref_task_arithmetic(base[name], [a[name], b[name]], w).to(torch.bfloat16), name)
    # the gradient really varied: 5 layer positions, outside tensors at t=0
    assert {w[0] for w in seen_weights} == {1.0, 0.75, 0.5, 0.375, 0.25}
    assert {w[1] for w in seen_weights} == {0.0, 0.125, 0.25, 0.375, 0.5, 0.75}


def test_scientific_notation_numbers(llama_family, tmp_path, capsys):
    """PyYAML (YAML 1.1) reads ``5e-1`` as the string '5e-1'; mergekit takes such strings as numbers
    for numeric parameters, so published recipes that write them must work here too."""
    import json

    from mergekitlite.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {llama_family['base']}\n"
        "models:\n"
        f"  - model: {llama_family['a']}\n    parameters:\n      weight: 5e-1\n"
        f"  - model: {llama_family['b']}\n    parameters:\n      weight: 1.25e+0\n"
        "parameters:\n  lambda: 1e0\n"
    )
    assert main(["plan", str(recipe), "--json"]) == 0, capsys.readouterr().err
    plan = json.loads(capsys.readouterr().out)
    for task in plan["tensors"]:
        assert task["params"]["weight"] == [0.5, 1.25], task
        assert task["params"]["lambda"] == 1.0, task
