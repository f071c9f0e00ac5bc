"""The positioned YAML loader: positions, duplicate keys, anchors/aliases and merge keys as a YAML
loader (and so mergekit) reads them, and bounded work on hostile files (alias bombs, deep nesting)."""

from __future__ import annotations

import time

import pytest
import yaml

from mergekitlite import parse_recipe
from mergekitlite.cli import main
from mergekitlite.errors import RecipeError
from mergekitlite.yamlpos import MAX_DEPTH, MAX_VALUES, Duplicate, Mark, YamlSyntaxError, load_positioned_all

# 342 bytes that stand for 9**9 (387 million) strings.
BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
)


def refused(text: str) -> YamlSyntaxError:
    with pytest.raises(YamlSyntaxError) as info:
        load_positioned_all(text)
    return info.value


def test_billion_laughs_is_refused_quickly_at_the_alias():
    start = time.monotonic()
    err = refused(BOMB)
    assert time.monotonic() - start < 5  # refused after MAX_VALUES values, not 387 million
    # The alias whose expansion crosses the limit: a..d and the first *d of 'e: &e [*d, *d, ...]' stay
    # under it (about 16,000 values), the second *d (7,381 more) crosses it.
    assert err.mark == Mark(5, BOMB.splitlines()[4].index("*d, *d") + 5)
    assert str(err) == (
        f"alias *d makes the file stand for more than {MAX_VALUES} values, the limit for a recipe "
        "(aliases of aliases multiply: a 'billion laughs' file?)"
    )


def test_billion_laughs_through_validate_is_one_line(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text("merge_method: linear\nmodels: [{model: x, parameters: {weight: 1}}]\n" + BOMB)
    start = time.monotonic()
    assert main(["validate", str(path)]) == 2
    assert time.monotonic() - start < 5
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"{path}:7:") and f"more than {MAX_VALUES} values" in out[0]


def test_an_alias_bomb_in_merge_keys_is_refused():
    text = "a: &a {x0: 1, x1: 1, x2: 1, x3: 1, x4: 1, x5: 1, x6: 1, x7: 1, x8: 1, x9: 1}\n"
    text += "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcde", "bcdef"))
    text += "g: {<<: [*f]}\n"
    assert "the limit for a recipe" in str(refused(text))


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,  # libyaml's own limit (1000) or ours
        "a: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n",
        "".join(" " * i + "k:\n" for i in range(MAX_DEPTH + 2)) + " " * (MAX_DEPTH + 2) + "v\n",
    ],
    ids=["flow-100k", "flow-just-over", "block-just-over"],
)
def test_deep_nesting_is_refused(text):
    start = time.monotonic()
    err = refused(text)
    assert time.monotonic() - start < 5
    assert err.mark is not None
    assert "nest" in str(err)  # ours: 'nested more than 32 levels deep'; libyaml's: 'maximum nesting depth'


def test_nesting_at_the_limit_is_fine():
    text = "a: " + "[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1) + "\n"
    (doc,) = load_positioned_all(text)
    node = doc.data["a"]
    for _ in range(MAX_DEPTH - 2):
        node = node[0]
    assert node == [1]


def test_aliases_that_nest_deeper_than_the_limit_are_refused():
    text = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [[*a{i - 1}]]\n" for i in range(1, MAX_DEPTH))
    err = refused(text)
    assert "nested more than" in str(err)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [*a]\n", "alias *a refers to a value that contains it"),
        ("a: &a {b: *a}\n", "alias *a refers to a value that contains it"),
        ("a: &a {<<: *a}\n", "nested more than"),
    ],
)
def test_recursive_aliases_are_refused(text, message):
    assert message in str(refused(text))


def test_too_many_values_without_aliases():
    err = refused("a: [" + ", ".join(["1"] * (MAX_VALUES + 10)) + "]\n")
    assert str(err) == f"more than {MAX_VALUES} values (the limit for a recipe)"


def test_other_hostile_input_is_a_one_line_error():
    assert refused("a: 1\x00\n").mark == Mark(1, 5)
    assert "digits" in str(refused("a: " + "1" * 5000 + "\n"))
    assert str(refused("? [a, b]\n: 1\n")) == "a mapping key must be a plain value, not a list or mapping"
    assert str(refused("a: {<<: 5}\n")) == "'<<' merges a mapping or a list of mappings"


def test_a_large_ordinary_file_is_quick():
    """~1 MB of comments and long strings: linear work in libyaml, a few values for us."""
    text = "# " + "x" * 500_000 + "\n" + "a: '" + "y" * 500_000 + "'\nb: [1, 2]\n"
    start = time.monotonic()
    (doc,) = load_positioned_all(text)
    assert time.monotonic() - start < 5
    assert doc.data["b"] == [1, 2] and len(doc.data["a"]) == 500_000


# ---------------------------------------------------------------- what YAML loaders (mergekit) read

SHARED = """\
merge_method: ties
base_model: org/base
models:
  - model: org/a
    parameters: &p
      weight: 0.5
      density: 0.4
  - model: org/b
    parameters: *p
  - model: org/c
    parameters:
      <<: *p
      weight: 0.25
  - model: org/d
    parameters:
      <<: [{weight: 0.125}, *p]
"""


def test_modest_aliases_and_merge_keys_work_as_in_yaml_loaders():
    loaded = parse_recipe(SHARED, source="r.yaml")
    assert loaded.warnings == ()
    params = [m.parameters for m in loaded.recipe.models]
    assert params == [
        {"weight": 0.5, "density": 0.4},
        {"weight": 0.5, "density": 0.4},
        {"weight": 0.25, "density": 0.4},
        {"weight": 0.125, "density": 0.4},  # the first merged mapping wins
    ]
    # PyYAML agrees, but for org/d (see yamlpos: its 6.0.3+ lets the later merged mapping win here).
    agreed = SHARED[: SHARED.index("  - model: org/d")]
    assert [doc.data for doc in load_positioned_all(agreed)] == [yaml.safe_load(agreed)]


def test_an_error_in_an_aliased_value_points_at_the_anchor():
    text = SHARED.replace("density: 0.4", "density: .nan")
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="r.yaml")
    lines = info.value.problems
    assert len(lines) == 4 and all(ln.startswith("r.yaml:7:16: models[") for ln in lines), lines


def test_duplicates_and_positions():
    text = "a: 1\nb:\n  - x: 1\n    x: 2\na: 3\nc: {<<: {d: 1}, d: 2}\n"
    (doc,) = load_positioned_all(text)
    assert doc.data == yaml.safe_load(text) == {"a": 3, "b": [{"x": 2}], "c": {"d": 2}}
    # A merged key overridden by the mapping's own is YAML's rule, not a duplicate.
    assert doc.duplicates == [
        Duplicate(("b", 0, "x"), Mark(4, 5), Mark(3, 5)),
        Duplicate(("a",), Mark(5, 1), Mark(1, 1)),
    ]
    assert doc.keys[("b", 0, "x")] == Mark(4, 5) and doc.values[("b", 0, "x")] == Mark(4, 8)


def test_documents_spans_are_in_characters():
    text = "# 差分マージ\nname: 日本語\n---\nb: &x [1, 2]\nc: *x\n"
    docs = load_positioned_all(text)
    assert [text[d.span[0] : d.span[1]] for d in docs] == ["name: 日本語\n", "b: &x [1, 2]\nc: *x\n"]
    assert docs[1].data == {"b": [1, 2], "c": [1, 2]}
    assert docs[1].values[("b",)] == Mark(4, 4)  # the anchored value, from its anchor
    assert docs[1].values[("c",)] == Mark(5, 4) and docs[1].values[("c", 0)] == Mark(4, 8)  # alias; its content
