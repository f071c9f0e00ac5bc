"""Keys mergekit ignores: a warning (file:line:col, the key's path, what was probably meant, what
mergekit does with it), never a different model; ``strict`` (``--strict``) makes each an error.

mergekit's Pydantic models (MergeConfiguration, InputModelDefinition, InputSliceDefinition,
OutputSliceDefinition, ConditionalParameter, TokenizerConfig, ...) all keep Pydantic's default
``extra="ignore"``; its planner reads only the parameters a method declares; YAML keeps the later of
two equal keys. The last test merges a recipe full of such keys and the same recipe without them:
the tensors are the same bits, and those of an independently computed reference.
"""

from __future__ import annotations

import pytest
import torch
from builders import assert_bitwise, load_tensors, ref_task_arithmetic
from builders import text_position as at

from mergekitlite import MergeOptions, parse_recipe, run_merge
from mergekitlite.cli import main, merge_main
from mergekitlite.errors import RecipeError
from mergekitlite.recipe import load_recipe, load_recipes, parse_recipes

BASE = """\
merge_method: task_arithmetic
base_model: org/base
models:
  - model: org/a
    parameters:
      weight: 1.0
"""

TOP_KEYS = (
    "merge_method, base_model, models, slices, modules, parameters, dtype, out_dtype, tokenizer_source, tokenizer, "
    "chat_template, name, output, compute_dtype, random_seed, trust_remote_code, rules"
)

# (recipe text, the key as written, the whole expected warning after "r.yaml:LINE:COL: ")
CASES = {
    "misspelled tokenizer_source": (
        BASE + "tokenzer_source: org/a\n",
        "tokenzer_source",
        "tokenzer_source: unknown key (did you mean 'tokenizer_source'?); mergekit ignores this key: "
        "the tokenizer comes from the base model",
    ),
    "misspelled parameter": (
        BASE + "      nomalize: true\n",
        "nomalize",
        "models[0].parameters.nomalize: unknown parameter for task_arithmetic (did you mean 'normalize'?); "
        "it takes: lambda, normalize, weight; mergekit ignores it",
    ),
    "parameter at the top level": (
        BASE + "int8_mask: true\n",
        "int8_mask",
        "int8_mask: unknown key ('int8_mask' is a merge parameter: it takes effect under 'parameters:'); "
        "mergekit ignores this key: it sets no parameter",
    ),
    "parameter on a model, beside its parameters": (
        BASE + "    weight: 0.5\n",
        "weight: 0.5",
        "models[0].weight: unknown key ('weight' is a merge parameter: it takes effect under 'parameters:'); "
        "mergekit ignores this key: it sets no parameter",
    ),
    "unknown top-level key": (
        BASE + "embed_slerp: true\n",
        "embed_slerp",
        f"embed_slerp: unknown key; expected one of: {TOP_KEYS}; mergekit ignores this key",
    ),
    "unknown key of a slice source": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: org/a\n        layer_range: [0, 2]\n"
        "        down_proj: 0.5\n",
        "down_proj",
        "slices[0].sources[0].down_proj: unknown key; expected one of: model, layer_range, parameters; "
        "mergekit ignores this key",
    ),
    "unknown key of a slice": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: org/a\n        layer_range: [0, 2]\n"
        "    residual_weigth: 0.5\n",
        "residual_weigth",
        "slices[0].residual_weigth: unknown key (did you mean 'residual_weight'?); mergekit ignores this key",
    ),
    "misspelled filter": (
        BASE.replace("weight: 1.0", "weight:\n        - fliter: mlp\n          value: 0.5\n        - value: 1.0"),
        "fliter",
        "models[0].parameters.weight[0].fliter: unknown key (did you mean 'filter'?); mergekit ignores this key: "
        "this rule has no filter, so it applies to every tensor",
    ),
    "unknown key of the tokenizer": (
        BASE + "tokenizer:\n  source: base\n  pad_to_multiple: 64\n",
        "pad_to_multiple",
        "tokenizer.pad_to_multiple: unknown key (did you mean 'pad_to_multiple_of'?); mergekit ignores this key",
    ),
    "unknown key of a token's source": (
        BASE + "tokenizer:\n  source: base\n  tokens:\n    '<x>':\n      source: {kind: zero, weight: 1}\n",
        "weight: 1}",
        "tokenizer.tokens.<x>.source.weight: unknown key; expected one of: kind, model, token, token_id; "
        "mergekit ignores this key",
    ),
    "other method's parameter": (
        BASE + "parameters:\n  density: 0.5\n",
        "density",
        "parameters.density: task_arithmetic does not use 'density'; mergekit ignores it",
    ),
    "duplicate key": (
        BASE + "dtype: bfloat16\ndtype: float16\n",
        "dtype: float16",
        "dtype: duplicate key (also on line 7); mergekit, as any YAML loader, uses this later value and ignores "
        "the one on line 7",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ignored_key_is_a_warning_that_strict_makes_an_error(case):
    text, needle, message = CASES[case]
    expected = f"r.yaml:{at(text, needle)}: {message}"
    loaded = parse_recipe(text, source="r.yaml")
    assert loaded.warnings == (expected,)
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="r.yaml", strict=True)
    assert info.value.problems == [expected]


def test_the_ignored_key_is_gone_from_the_recipe():
    """What the warning says is what happens: the key has no effect on the validated recipe."""
    text, _, _ = CASES["misspelled filter"]
    rule = parse_recipe(text).recipe.models[0].parameters["weight"][0]
    assert rule.filter is None and rule.value == 0.5
    assert parse_recipe(CASES["duplicate key"][0]).recipe.dtype == "float16"
    assert "weight" not in parse_recipe(CASES["parameter on a model, beside its parameters"][0]).recipe.models[0]
    recipe = parse_recipe(CASES["misspelled tokenizer_source"][0]).recipe
    assert recipe.tokenizer_source is None and recipe.tokenizer is None


def test_strict_in_every_loader(tmp_path):
    text = CASES["unknown top-level key"][0]
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert load_recipe(path).warnings and load_recipes(path)[0].warnings and parse_recipes(text)[0].warnings
    for load in (lambda: load_recipe(path, strict=True), lambda: load_recipes(path, strict=True)):
        with pytest.raises(RecipeError, match=rf"^{path}:7:1: embed_slerp: unknown key"):
            load()
    with pytest.raises(RecipeError, match=r"^<recipe>:7:1: embed_slerp: unknown key"):
        parse_recipes(text, strict=True)


def test_strict_lists_warnings_and_errors_together_in_file_order():
    text = BASE.replace("org/a", "org/a\n    paramters: {}") + "tokenzer_source: x\ndtype: int8\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="r.yaml", strict=True)
    lines = info.value.problems
    assert [ln.split(": ")[1] for ln in lines] == ["models[0].paramters", "tokenzer_source", "dtype"]
    assert lines[2].startswith(f"r.yaml:{at(text, 'int8')}: dtype: unknown dtype 'int8'")


def test_modules_with_models_is_an_error():
    """mergekit: exactly one of 'models', 'slices' or 'modules'."""
    text = BASE + "modules:\n  text_decoder:\n    models: []\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="r.yaml")
    assert info.value.problems == [
        f"r.yaml:{at(text, 'modules')}: modules: give one of 'models', 'slices' or 'modules', not models and modules"
    ]


@pytest.mark.parametrize(
    ("extra", "source", "pad"),
    [
        ("tokenizer_source: union\n", None, None),
        ("tokenizer:\n  source: union\n", "union", None),
        ("tokenizer: {}\n", "union", None),  # mergekit's default source
        ("tokenizer:\n  source: base\n  pad_to_multiple_of: 64\n", "base", 64),
    ],
)
def test_union_and_padding_validate(extra, source, pad):
    recipe = parse_recipe(BASE + extra, source="r.yaml").recipe
    if source is None:
        assert recipe.tokenizer_source == "union"
    else:
        assert recipe.tokenizer is not None
        assert (recipe.tokenizer.source, recipe.tokenizer.pad_to_multiple_of) == (source, pad)


# ---------------------------------------------------------------- through the command line


def test_validate_prints_warnings_and_strict_exits_2(tmp_path, capsys):
    text, needle, message = CASES["misspelled tokenizer_source"]
    path = tmp_path / "r.yaml"
    path.write_text(text)
    line = f"{path}:{at(text, needle)}: {message}"
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"warning: {line}", f"{path}: ok"]
    assert main(["validate", "--strict", str(path)]) == 2
    assert capsys.readouterr().out.splitlines() == [line]


def test_merge_strict_exits_2_and_writes_nothing(llama_family, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    text = (
        f"merge_method: linear\nmodels:\n  - model: {llama_family['a']}\n    parameters: {{weight: 1.0}}\n"
        "nomalize: false\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    assert merge_main([str(recipe), str(tmp_path / "out"), "--strict", "--no-hash"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {recipe}:5:1: nomalize: unknown key") and "mergekit ignores this key" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_messages_are_printed_without_markup_or_emoji(tmp_path, capsys, monkeypatch):
    """rich would print ':100:' as an emoji and '[bold]' as a style: both must come out as written."""
    monkeypatch.setenv("COLUMNS", "1000")
    text = BASE + "#\n" * 93 + "'[bold]x': 1\n"  # the unknown key is on line 100
    path = tmp_path / "r.yaml"
    path.write_text(text)
    expected = f"{path}:100:1: [bold]x: unknown key; expected one of: {TOP_KEYS}; mergekit ignores this key"
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"warning: {expected}"
    assert main(["validate", "--strict", str(path)]) == 2
    assert capsys.readouterr().out.splitlines() == [expected]
    assert merge_main([str(path), str(tmp_path / "out"), "--strict"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {expected}"]


# ---------------------------------------------------------------- the same model as without the keys

CLEAN = """\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters:
      weight: 0.5
  - model: {b}
    parameters:
      weight:
        - value: 0.25
        - value: [0.25, 0.75]
parameters:
  lambda: 0.875
dtype: bfloat16
"""

# The same recipe with keys mergekit ignores; each would change the tensors if it were applied.
NOISY = """\
merge_method: task_arithmetic
base_model: {base}
tokenzer_source: {b}
int8_mask: true
embed_slerp: true
models:
  - model: {a}
    weight: 2.0
    parameters:
      weight: 0.5
      nomalize: true
  - model: {b}
    parameters:
      weight:
        - fliter: self_attn
          value: 0.25
        - value: [0.25, 0.75]
parameters:
  lambda: 0.5
  lambda: 0.875
  normalise: true
dtype: bfloat16
"""


def test_ignored_keys_give_the_same_tensors_as_without_them(llama_family, tmp_path):
    fam = {k: str(v) for k, v in llama_family.items()}
    outs = {}
    for name, template in (("clean", CLEAN), ("noisy", NOISY)):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(template.format(**fam))
        loaded = load_recipe(recipe)
        assert len(loaded.warnings) == (0 if name == "clean" else 8), loaded.warnings
        run_merge(recipe, tmp_path / name, MergeOptions(hash_inputs=False))
        outs[name] = load_tensors(tmp_path / name)
    base, a, b = (load_tensors(llama_family[k]) for k in ("base", "a", "b"))
    assert set(outs["noisy"]) == set(outs["clean"]) == set(base)
    for tensor, clean in outs["clean"].items():
        assert_bitwise(outs["noisy"][tensor], clean, tensor)
        # every tensor: the first rule (no filter) gives b the weight 0.25; no normalize; lambda 0.875
        expected = ref_task_arithmetic(base[tensor], [a[tensor], b[tensor]], [0.5, 0.25], lam=0.875)
        assert_bitwise(clean, expected.to(torch.bfloat16), tensor)


def test_the_warnings_of_the_noisy_recipe():
    text = NOISY.format(base="org/base", a="org/a", b="org/b")
    warned = [w.split(": ")[1] for w in parse_recipe(text).warnings]
    assert warned == [
        "tokenzer_source",
        "int8_mask",
        "embed_slerp",
        "models[0].weight",
        "models[0].parameters.nomalize",
        "models[1].parameters.weight[0].fliter",
        "parameters.lambda",
        "parameters.normalise",
    ]
