"""SLERP, NuSLERP, Multi-SLERP and the Karcher mean, checked by geometry worked out in the tests."""

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


def run(name: str, base: Tensor | None, models: Sequence[Tensor], *, rows: int | None = None, **given: Any) -> Tensor:
    """Merge through the method's spec as the executor does, defaults filled in as the planner would."""
    spec = get_method(name)
    params: dict[str, Any] = {}
    for p in spec.params:
        if p.name in given:
            value = given.pop(p.name)
        else:
            assert not p.required, f"test must give {p.name}"
            value = (p.default,) * len(models) if p.per_model else p.default
        params[p.name] = tuple(value) if p.per_model else value
    assert not given, f"unknown parameters {given}"
    return merge_in_chunks(spec, base, list(models), params, rows_per_chunk=rows)


def assert_close(got: Tensor, want: Tensor, atol: float = 1e-6) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    assert bool(((got - want).abs() <= atol).all()), f"max error {(got - want).abs().max()}"


def plane(*points: tuple[float, float], shape: tuple[int, ...] = (2, 2)) -> list[Tensor]:
    """2-D points embedded as the first two entries of zero tensors of ``shape``."""
    out = []
    for x, y in points:
        v = torch.zeros(math.prod(shape))
        v[0], v[1] = x, y
        out.append(v.reshape(shape))
    return out


def polar(radius: float, angle: float) -> tuple[float, float]:
    return radius * math.cos(angle), radius * math.sin(angle)


# ---------------------------------------------------------------------------------------------
# SLERP


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("angle", [0.3, math.pi / 2, 2.5])
def test_slerp_rotates_at_constant_speed(t: float, angle: float) -> None:
    # Two vectors of equal length at an angle: slerp(t) is the same length rotated by t·angle.
    base, other = plane(polar(3, 0.0), polar(3, angle))
    (expected,) = plane(polar(3, t * angle))
    for rows in (None, 1):
        assert_close(run("slerp", base, [other], rows=rows, t=t), expected)


def test_slerp_keeps_unequal_norms_as_mergekit() -> None:
    # mergekit interpolates the directions' coefficients but applies them to the raw vectors:
    # orthogonal (3, 0) and (0, 4) at t = ⅓: sin(π/3)·(3, 0) + sin(π/6)·(0, 4)
    base, other = plane((3, 0), (0, 4))
    (expected,) = plane((3 * math.sqrt(3) / 2, 4 * 0.5))
    assert_close(run("slerp", base, [other], t=1 / 3), expected)


@pytest.mark.parametrize("factor", [2.0, -1.0, 0.5])
def test_slerp_colinear_falls_back_to_lerp(factor: float) -> None:
    base = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    other = base * factor
    assert_close(run("slerp", base, [other], t=0.3), base * 0.7 + other * 0.3)


def test_slerp_threshold_is_on_the_cosine() -> None:
    t = 0.5
    near = math.acos(0.9996)  # |cos| > 0.9995 → lerp
    base, other = plane(polar(1, 0.0), polar(1, near))
    (lerp,) = plane(((1 + math.cos(near)) / 2, math.sin(near) / 2))
    assert_close(run("slerp", base, [other], t=t), lerp)
    far = math.acos(0.999)  # below the threshold → rotation
    base, other = plane(polar(1, 0.0), polar(1, far))
    (rotated,) = plane(polar(1, t * far))
    assert_close(run("slerp", base, [other], t=t), rotated)


def test_slerp_zero_base_is_not_normalised() -> None:
    # mergekit leaves a zero vector as it is: its "cosine" is 0, so θ = π/2 → sin(tπ/2)·other.
    base = torch.zeros(2, 3)
    other = torch.arange(6.0).reshape(2, 3)
    assert_close(run("slerp", base, [other], t=0.4), other * math.sin(0.4 * math.pi / 2))


# ---------------------------------------------------------------------------------------------
# NuSLERP


def test_nuslerp_interpolates_task_vectors_with_weight_ratio() -> None:
    base = torch.full((2, 2), 0.5)
    d0, d1 = plane((2, 0), (0, 2))
    (rotated,) = plane(polar(2, 0.75 * math.pi / 2))  # t = 3 / (1 + 3)
    out = run("nuslerp", base, [base + d0, base + d1], weight=(1.0, 3.0))
    assert_close(out, base + rotated)
    # without a base the models themselves are interpolated
    assert_close(run("nuslerp", None, [d0, d1], weight=(1.0, 3.0)), rotated)


def test_nuslerp_zero_weight_sum_and_colinear() -> None:
    base = torch.zeros(2, 2)
    d0, d1 = plane((1, 1), (3, 3))
    # colinear → lerp with t = 0.75
    assert_close(run("nuslerp", base, [d0, d1], weight=(0.5, 1.5)), d0 * 0.25 + d1 * 0.75)
    # weights summing to 0 → t = ½
    a, b = plane((2, 0), (0, 2))
    (mid,) = plane(polar(2, math.pi / 4))
    assert_close(run("nuslerp", base, [a, b], weight=(1.0, -1.0)), mid)


def test_nuslerp_per_row_and_per_column() -> None:
    # Row 0: orthogonal (2, 0) vs (0, 2) → rotation; row 1: (1, 2) vs (2, 4), colinear → lerp.
    a = torch.tensor([[2.0, 0.0], [1.0, 2.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 4.0]])
    t = 0.25
    rotated = [2 * math.cos(t * math.pi / 2), 2 * math.sin(t * math.pi / 2)]
    lerped = [1 * 0.75 + 2 * 0.25, 2 * 0.75 + 4 * 0.25]
    expected = torch.tensor([rotated, lerped])
    for rows in (None, 1):
        out = run("nuslerp", None, [a, b], rows=rows, weight=(3.0, 1.0), nuslerp_flatten=False)
        assert_close(out, expected)
        # nuslerp_row_wise works on fibers along dim 0: the same problem transposed
        out = run(
            "nuslerp",
            None,
            [a.T.contiguous(), b.T.contiguous()],
            rows=rows,
            weight=(3.0, 1.0),
            nuslerp_flatten=False,
            nuslerp_row_wise=True,
        )
        assert_close(out, expected.T.contiguous())


# ---------------------------------------------------------------------------------------------
# Multi-SLERP


def reference_multislerp(vectors: list[Tensor], weight: list[float], eps: float = 1e-8) -> Tensor:
    """The definition step by step on explicit float64 vectors: project onto the tangent space at the
    weighted mean direction, average there, map back with the exponential map, scale by the mean norm."""
    vs = [v.double().reshape(-1) for v in vectors]
    w = [x / sum(weight) for x in weight]
    norms = [float(v.norm()) for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms, strict=True)]
    mean = sum(wi * u for wi, u in zip(w, units, strict=True))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units, strict=True))
    r = float(tangent.norm()) + eps
    out = (mean * math.cos(r) + tangent * (math.sin(r) / r)) * sum(wi * n for wi, n in zip(w, norms, strict=True))
    return out.float().reshape(vectors[0].shape)


def test_multislerp_equal_weights_give_the_normalised_midpoint() -> None:
    a, b = plane((3, 0), (0, 5))
    (expected,) = plane(polar(4, math.pi / 4))  # mean norm (3 + 5)/2 along the bisector
    assert_close(run("multislerp", None, [a, b], weight=(1.0, 1.0)), expected)


def test_multislerp_matches_its_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=gen)
    models = [base + torch.randn(3, 4, generator=gen) for _ in range(3)]
    weight = [0.2, 0.5, 0.3]
    want = base + reference_multislerp([m - base for m in models], weight)
    for rows in (None, 1, 2):
        assert_close(run("multislerp", base, models, rows=rows, weight=weight), want, atol=2e-6)
    assert_close(run("multislerp", None, models, weight=weight), reference_multislerp(models, weight), atol=2e-6)


def test_multislerp_edge_cases() -> None:
    a = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    assert torch.equal(run("multislerp", None, [a], weight=(1.0,)), a)
    # two antipodal inputs with equal weights: the weighted sum Σ wᵢvᵢ = 0
    base = torch.ones(2, 2)
    assert_close(run("multislerp", base, [base + a, base - a], weight=(1.0, 1.0)), base)
    with pytest.raises(MethodInputError, match="antipodal"):
        run("multislerp", base, [base + a, base - a, base.clone()], weight=(1.0, 1.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Karcher mean


def test_karcher_two_points_is_the_geodesic_midpoint() -> None:
    a, b = plane((3, 0), (0, 4))
    (expected,) = plane(polar(3.5, math.pi / 4))
    assert_close(run("karcher", None, [a, b]), expected)


def test_karcher_on_a_great_circle_averages_the_angles() -> None:
    # On one great circle the Karcher mean's direction is at the mean angle (0 + 0.2 + 1.0)/3 = 0.4,
    # which the Euclidean mean's direction is not (so the iteration is exercised).
    points = plane(polar(2, 0.0), polar(2, 0.2), polar(2, 1.0))
    (expected,) = plane(polar(2, 0.4))
    euclid = sum(points) / 3
    assert abs(math.atan2(float(euclid[0, 1]), float(euclid[0, 0])) - 0.4) > 1e-3
    assert_close(run("karcher", None, points), expected)
    # the base model, when set, is one more point of equal weight
    assert_close(run("karcher", points[2], points[:2]), expected)


def test_karcher_zero_inputs() -> None:
    a, zero = plane((3, 0), (0, 0))
    (expected,) = plane((1.5, 0))  # direction from the non-zero input, scale = mean norm (3 + 0)/2
    assert_close(run("karcher", None, [a, zero]), expected)
    assert torch.equal(run("karcher", None, [zero, zero.clone()]), zero)
    assert_close(run("karcher", None, [a, a.clone()]), a)
