"""Parameter evaluation: scalars, gradients over layers and filtered rules, with mergekit's
semantics (expected values worked out by hand here)."""

from __future__ import annotations

import pytest

from mergekitlite.recipe import ConditionalParameter as Rule
from mergekitlite.settings import evaluate, interpolate, is_gradient, name_matches

ATTN = "model.layers.3.self_attn.q_proj.weight"
MLP = "model.layers.3.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"


@pytest.mark.parametrize("value", [0.5, 2, True, False, "abc"])
def test_scalar_is_used_as_is(value):
    assert evaluate(value, ATTN, 0.7) == value
    assert type(evaluate(value, ATTN, 0.7)) is type(value)


@pytest.mark.parametrize(
    ("gradient", "t", "expected"),
    [
        ([0.0, 1.0], 0.0, 0.0),
        ([0.0, 1.0], 1.0, 1.0),
        ([0.0, 1.0], 0.25, 0.25),
        ([0.2, 0.6, 1.0], 0.5, 0.6),  # exactly on the middle point
        ([0.2, 0.6, 1.0], 0.25, 0.4),  # halfway between the first two points
        ([0.2, 0.6, 1.0], 0.75, 0.8),
        ([1, 0.5, 0.7, 0.3, 0], 0.375, 0.6),  # segment 1..2 at 0.5
        ([3.0], 0.4, 3.0),  # a one-point gradient is a constant
        ([0, 4], 0.5, 2.0),  # integers interpolate too
    ],
)
def test_gradient_interpolation(gradient, t, expected):
    assert interpolate(gradient, t) == pytest.approx(expected, abs=1e-12)
    assert evaluate(gradient, ATTN, t) == pytest.approx(expected, abs=1e-12)


def test_gradient_matches_mergekit_rounding():
    """mergekit computes (1 - frac)·v[i0] + frac·v[i1]; the same float64 operations give the same bits."""
    gradient, t = [0.1, 0.7, 0.3], 2 / 7
    scaled = t * 2
    i0 = int(scaled)
    frac = scaled - i0
    assert interpolate(gradient, t) == (1 - frac) * gradient[i0] + frac * gradient[i0 + 1]


def test_first_matching_filter_wins():
    rules = [Rule(filter="self_attn", value=0.1), Rule(filter="layers.3", value=0.2), Rule(value=0.3)]
    assert evaluate(rules, ATTN, 0.0) == 0.1
    assert evaluate(rules, MLP, 0.0) == 0.2
    assert evaluate(rules, EMBED, 0.0) == 0.3


def test_no_matching_filter_gives_none():
    rules = [Rule(filter="self_attn", value=0.1)]
    assert evaluate(rules, MLP, 0.0) is None
    assert evaluate(Rule(filter="mlp", value=1.0), ATTN, 0.0) is None
    assert evaluate(Rule(filter="mlp", value=1.0), MLP, 0.0) == 1.0


def test_filter_value_may_be_a_gradient():
    rules = [Rule(filter="mlp", value=[0.0, 1.0]), Rule(value=[1.0, 0.0])]
    assert evaluate(rules, MLP, 0.25) == pytest.approx(0.25)
    assert evaluate(rules, ATTN, 0.25) == pytest.approx(0.75)
    assert is_gradient(rules) and is_gradient([0.0, 1.0]) and is_gradient(Rule(value=[1.0]))
    assert not is_gradient([Rule(filter="mlp", value=1.0)]) and not is_gradient(0.5)


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        (None, ATTN, True),
        ("*", ATTN, True),
        ("self_attn", ATTN, True),  # plain strings are substrings (mergekit)
        ("attn", ATTN, True),
        ("layers.3", ATTN, True),
        ("layers.30", ATTN, False),
        ("mlp", ATTN, False),
        ("q_proj.weight", ATTN, True),
        ("*.self_attn.*", ATTN, True),  # globs match the whole name
        ("self_attn.*", ATTN, False),
        ("model.layers.[0-3].*", ATTN, True),
        ("model.layers.[4-9].*", ATTN, False),
        ("re:layers\\.[0-9]+\\.mlp", MLP, True),  # regexes are searched
        ("re:^mlp", MLP, False),
        ("re:embed_tokens$", EMBED, False),
        ("re:embed_tokens\\.weight$", EMBED, True),
    ],
)
def test_name_matches(pattern, name, matches):
    assert name_matches(pattern, name) is matches


def test_plain_filter_with_dots_is_not_a_regex():
    # '.' in a plain filter is a literal dot, not "any character".
    assert not name_matches("layers.3.mlp", "model.layers_3_mlp.weight")
    assert name_matches("layers.3.mlp", MLP)
