"""Model Stock against hand-worked results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from mergekitlite.errors import MethodInputError
from mergekitlite.methods import get_method
from mergekitlite.methods.apply import merge_in_chunks


def run(name: str, base: Tensor, models: Sequence[Tensor], *, rows: int | None = None, **given: Any) -> Tensor:
    """Merge through the method's spec as the executor does, defaults filled in as the planner would."""
    spec = get_method(name)
    params = {p.name: given.pop(p.name, p.default) for p in spec.params}
    assert not given, f"unknown parameters {given}"
    return merge_in_chunks(spec, base, list(models), params, rows_per_chunk=rows)


def assert_close(got: Tensor, want: Tensor, atol: float = 1e-6) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert bool(((got - want).abs() <= atol).all()), f"max error {(got - want).abs().max()}"


BASE = torch.tensor([[1.0, -1.0], [0.5, 2.0]])


def test_model_stock_two_models() -> None:
    # offsets (1, 0, 0, 0) and (1, 1, 0, 0): cos θ = 1/√2 → t = 2c/(1 + c)
    o1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    o2 = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    expected = BASE + t * (o1 + o2) / 2  # t·mean(models) + (1 − t)·base
    for rows in (None, 1):
        assert_close(run("model_stock", BASE, [BASE + o1, BASE + o2], rows=rows), expected)


def test_model_stock_three_models_uses_the_mean_pairwise_cosine() -> None:
    # orthogonal offsets: every cosine 0 → t = 0 → the base
    offsets = [torch.tensor(v) for v in ([[1.0, 0], [0, 0]], [[0, 1.0], [0, 0]], [[0, 0], [1.0, 0]])]
    assert_close(run("model_stock", BASE, [BASE + o for o in offsets]), BASE)
    # identical offsets: cos 1 → t = N/(1 + N − 1) = 1 → the models' average
    same = torch.tensor([[0.5, 0.25], [-1.0, 2.0]])
    assert_close(run("model_stock", BASE, [BASE + same] * 3), BASE + same)
    # cosines 1/√2, 0, 1/√2 (a, a + b, b) → mean √2/3 → t = 3c/(1 + 2c)
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    c = (1 / math.sqrt(2) + 0 + 1 / math.sqrt(2)) / 3
    t = 3 * c / (1 + 2 * c)
    assert_close(run("model_stock", BASE, [BASE + a, BASE + a + b, BASE + b]), BASE + t * (2 * a + 2 * b) / 3)


def test_model_stock_filter_wise_works_per_row() -> None:
    # row 0: orthogonal offsets → t = 0 (base row); row 1: equal offsets → t = 1 (average row)
    o1 = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    o2 = torch.tensor([[0.0, 3.0], [2.0, 1.0]])
    expected = torch.stack([BASE[0], BASE[1] + o1[1]])
    for rows in (None, 1):
        assert_close(run("model_stock", BASE, [BASE + o1, BASE + o2], rows=rows, filter_wise=True), expected)
    # a vector is one row under filter_wise: the same as the whole-tensor angle
    v, w1, w2 = BASE[0], BASE[0] + o1[0], BASE[0] + torch.tensor([1.0, 1.0])
    assert torch.equal(run("model_stock", v, [w1, w2], filter_wise=True), run("model_stock", v, [w1, w2], rows=1))


def test_model_stock_edge_cases() -> None:
    # zero offsets: the norms clamp at 1e-6, cos = 0, t = 0 → base
    assert torch.equal(run("model_stock", BASE, [BASE.clone(), BASE.clone()]), BASE)
    # exactly opposite offsets with N = 2: 1 + (N − 1)·cos = 0 → t is infinite
    o = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(MethodInputError, match=r"mean cosine -1.0 = −1/\(N−1\).*divides by zero"):
        run("model_stock", BASE, [BASE + o, BASE - o])
    with pytest.raises(MethodInputError, match=r"filter_wise.*divides by zero"):
        run("model_stock", BASE, [BASE + o, BASE - o], filter_wise=True)
