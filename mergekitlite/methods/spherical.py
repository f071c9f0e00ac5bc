"""Spherical interpolation: SLERP, NuSLERP, Multi-SLERP and the Karcher mean.

Each result is a linear combination Σ cᵢ·vᵢ of its input vectors whose coefficients depend only on
their norms and mutual dot products, i.e. on their Gram matrix. So a statistic pass collects the Gram
matrix of the whole tensor (per-row float64 dot products, combined in a fixed order), the coefficients
are computed once in float64 with Python's ``math``, and the merge pass is a float32 weighted sum:
identical for any chunking, on CPU and GPU. Where a method works per fiber (NuSLERP without
flattening), each fiber's dot products come from its own chunk and its coefficients from ``math``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from mergekitlite.errors import MethodInputError
from mergekitlite.methods.linear_form import LinearForm, stats_linear_implementation
from mergekitlite.methods.primitives import (
    GramStatistic,
    RowPartials,
    StatisticFactory,
    chunk_rows,
    fiber_dot,
    matvec,
    quad,
    row_sums,
)
from mergekitlite.methods.registry import ChunkInfo, Implementation, tensor_rows

Gram = Sequence[Sequence[float]]
_T = TypeVar("_T")  # a tensor, or an input's position in a linear form


def _need_stats(name: str, stats: object) -> None:
    if stats is None:
        raise TypeError(f"{name} needs its statistic: run it through its MethodSpec (executor, merge_in_chunks)")


def _finite_gram(name: str, gram: Gram) -> Gram:
    """The Gram matrix, if every entry is finite: the iterations in ``math`` raise on infinite ones (and
    NaN ones would make every coefficient NaN)."""
    if not all(math.isfinite(g) for row in gram for g in row):
        raise MethodInputError(
            f"{name}: the inputs hold NaN or infinite values (their dot products are not finite); "
            "check the models' weights for this tensor"
        )
    return gram


# ---------------------------------------------------------------------------------------------
# SLERP


def slerp_coefficients(
    t: float, g00: float, g11: float, g01: float, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[float, float]:
    """(c₀, c₁) with slerp = c₀v₀ + c₁v₁: θ = acos(⟨v̂₀, v̂₁⟩), c₀ = sin((1−t)θ)/sin θ, c₁ = sin(tθ)/sin θ;
    lerp (1 − t, t) when |cos θ| > 0.9995. As mergekit, a vector is normalised only if its norm > 1e-8."""
    n0, n1 = math.sqrt(g00), math.sqrt(g11)
    dot = g01 / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    if abs(dot) > dot_threshold:
        return 1 - t, t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return math.sin(theta - theta * t) / sin_theta, math.sin(theta * t) / sin_theta


def slerp(base: int | None, models: Sequence[int], *, t: float, stats: Gram | None = None) -> LinearForm:
    """slerp = sin((1−t)θ)/sin θ·base + sin(tθ)/sin θ·model, θ the angle between the two flattened tensors;
    (1−t)·base + t·model when they are nearly colinear (|cos θ| > 0.9995). ``t`` may vary per tensor
    (gradients, filters). Given as the linear form c₀·base + c₁·model over the input positions.
    """
    _need_stats("slerp", stats)
    assert stats is not None and base is not None
    gram = _finite_gram("slerp", stats)  # a NaN angle would make every element NaN
    c0, c1 = slerp_coefficients(t, gram[0][0], gram[1][1], gram[0][1])
    return LinearForm((base, models[0]), (c0, c1))


# ---------------------------------------------------------------------------------------------
# NuSLERP


def nuslerp_coefficients(t: float, g00: float, g11: float, g01: float) -> tuple[float, float]:
    """(c₀, c₁) of mergekit's nuslerp: norms clamped at 1e-7, cos θ clamped to [−1, 1],
    c₀ = sin((1−t)θ)/sin θ, c₁ = sin(tθ)/sin θ, and lerp (1 − t, t) where |sin θ| < 1e-8."""
    n0, n1 = max(math.sqrt(g00), 1e-7), max(math.sqrt(g11), 1e-7)
    theta = math.acos(min(1.0, max(-1.0, g01 / (n0 * n1))))
    sin_theta = math.sin(theta)
    if abs(sin_theta) < 1e-8:
        return 1 - t, t
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def nuslerp_t(weight: Sequence[float]) -> float:
    """t = w₁/(w₀ + w₁); 0.5 when |w₀ + w₁| < 1e-6 (as mergekit)."""
    total = weight[0] + weight[1]
    return 0.5 if abs(total) < 1e-6 else weight[1] / total


def _nuslerp_mode(shape: Sequence[int], params: Mapping[str, object]) -> str:
    """'whole': one angle for the flattened tensor; 'rows': one per fiber along the last dim (within a
    row, no statistic); 'columns': one per fiber along dim 0 (mergekit's ``nuslerp_row_wise``)."""
    if params["nuslerp_flatten"] or len(shape) < 2:
        return "whole"
    return "columns" if params["nuslerp_row_wise"] else "rows"


def _nuslerp_vectors(base: Tensor | None, models: Sequence[Tensor]) -> list[Tensor]:
    return list(models) if base is None else [m - base for m in models]


@dataclass
class _NuState:
    mode: str
    t: float
    rows: int
    whole: RowPartials
    columns: Tensor | None = None  # [3, *shape[1:]] float64 on the CPU: Σ over rows of v₀², v₁², v₀v₁
    folded: int = 0  # rows [0, folded) are in ``columns``
    pending: dict[int, Tensor] = field(default_factory=dict)  # row_start → [3, rows, ...] products not yet folded
    lock: threading.Lock = field(default_factory=threading.Lock)


class NuSlerpStatistic:
    """'whole': the Gram matrix of the two vectors; 'columns': per dim-0 fiber sums accumulated row by
    row in row order (a fixed sequential order); 'rows': nothing (``passes`` = 0).

    For 'columns', updates compute their chunk's products concurrently and hand them over; the products
    are added to the sums strictly in row order, as soon as every earlier row has been added, so only
    the chunks that arrived ahead of an earlier one wait (at most the executor's window of them)."""

    passes = 1
    concurrent = True

    def begin(self, shape: tuple[int, ...], n_models: int, params: Mapping[str, object]) -> _NuState:
        mode = _nuslerp_mode(shape, params)
        self.passes = 0 if mode == "rows" else 1
        weight = params["weight"]
        assert isinstance(weight, Sequence)
        rows = tensor_rows(shape)
        state = _NuState(mode, nuslerp_t(weight), rows, RowPartials(3, rows))
        if mode == "columns":
            state.columns = torch.zeros((3, *shape[1:]), dtype=torch.float64)
        return state

    def update(
        self,
        state: _NuState,
        pass_index: int,
        base: Tensor | None,
        models: list[Tensor],
        params: Mapping[str, object],
        chunk: ChunkInfo,
    ) -> None:
        if pass_index >= self.passes:
            return
        v0, v1 = _nuslerp_vectors(base, models)
        rows = chunk_rows(chunk)
        w0, w1 = v0.to(torch.float64), v1.to(torch.float64)  # widened once for the three products
        if state.mode == "whole":
            for idx, (a, b) in enumerate(((w0, w0), (w1, w1), (w0, w1))):
                state.whole.put(idx, chunk.row_start, row_sums(a * b, rows))
            return
        products = torch.stack([w0 * w0, w1 * w1, w0 * w1]).cpu()
        with state.lock:
            state.pending[chunk.row_start] = products
            _fold_in_order(state)

    def finish_pass(self, state: _NuState, pass_index: int) -> None:
        if state.mode == "columns":
            _fold_in_order(state)
            assert not state.pending and state.folded == state.rows, "nuslerp: a chunk of the pass is missing"

    def result(self, state: _NuState) -> tuple[float, float] | tuple[Tensor, Tensor] | None:
        if state.mode == "whole":
            return nuslerp_coefficients(state.t, *(state.whole.total(i) for i in range(3)))
        if state.mode == "columns":
            assert state.columns is not None
            return _coefficient_arrays(state.t, state.columns)
        return None


def _fold_in_order(state: _NuState) -> None:
    """Add the pending products of the rows that come next, one row after the other (the caller holds the lock).
    ``cumsum`` along the rows adds them sequentially, in float64, as a loop of row additions would."""
    while (products := state.pending.pop(state.folded, None)) is not None:
        assert state.columns is not None
        stacked = torch.cat([state.columns.unsqueeze(1), products], dim=1)
        state.columns = torch.cumsum(stacked, dim=1)[:, -1]
        state.folded += products.shape[1]


def _coefficient_arrays(t: float, sums: Tensor) -> tuple[Tensor, Tensor]:
    """nuslerp_coefficients for every fiber, given [3, ...] sums (v₀², v₁², v₀v₁): float64 arrays."""
    pairs = [nuslerp_coefficients(t, *g) for g in sums.reshape(3, -1).T.tolist()]
    c = torch.tensor(pairs, dtype=torch.float64).reshape(*sums.shape[1:], 2)
    return c[..., 0], c[..., 1]


def nuslerp(
    base: Tensor | None,
    models: Sequence[Tensor],
    *,
    weight: Sequence[float],
    nuslerp_row_wise: bool,
    nuslerp_flatten: bool,
    stats: tuple[float, float] | tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """slerp(v₀, v₁, t) with t = w₁/(w₀ + w₁), vᵢ = δᵢ with a base (the result then added to it), else mᵢ.

    ``nuslerp_flatten`` (default): one angle for the whole tensor; otherwise one per row (fibers along the
    last dim), or per column with ``nuslerp_row_wise`` (fibers along dim 0, mergekit's naming). Lerp where
    sin θ < 1e-8; norms are clamped at 1e-7.
    """
    v0, v1 = _nuslerp_vectors(base, models)
    if nuslerp_flatten or v0.dim() < 2 or nuslerp_row_wise:
        _need_stats("nuslerp", stats)
        assert stats is not None
        c0, c1 = stats
        if isinstance(c0, Tensor) and isinstance(c1, Tensor):
            c0, c1 = c0.to(v0.device, v0.dtype), c1.to(v0.device, v0.dtype)
    else:
        c0, c1 = _per_row_coefficients(nuslerp_t(weight), v0, v1)
    res = v0 * c0
    res.add_(v1 * c1)
    return res if base is None else res.add_(base)


def _per_row_coefficients(t: float, v0: Tensor, v1: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients per fiber along the last dim, from that fiber's own dot products, shaped [..., 1]."""
    sums = torch.stack([fiber_dot(v0, v0), fiber_dot(v1, v1), fiber_dot(v0, v1)]).squeeze(-1).cpu()
    c0, c1 = _coefficient_arrays(t, sums)
    return c0.unsqueeze(-1).to(v0.device, v0.dtype), c1.unsqueeze(-1).to(v0.device, v0.dtype)


# ---------------------------------------------------------------------------------------------
# Multi-SLERP


def multislerp_coefficients(gram: Gram, weight: Sequence[float], eps: float) -> list[float] | None:
    """Coefficients cᵢ of Σ cᵢvᵢ for mergekit's multislerp (barycentric interpolation on the sphere):
    uᵢ = vᵢ/(‖vᵢ‖ + ε); μ = Σ wᵢuᵢ/‖Σ wᵢuᵢ‖; τ = Σ wᵢ(uᵢ − ⟨uᵢ, μ⟩μ); r = ‖τ‖ + ε;
    result = (cos r·μ + sin r/r·τ)·Σ wᵢ‖vᵢ‖. ``None`` when ‖Σ wᵢuᵢ‖ < ε (antipodal inputs)."""
    n = len(weight)
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    a = [weight[i] / (norms[i] + eps) for i in range(n)]  # Σ wᵢuᵢ = Σ aᵢvᵢ
    mean_norm = math.sqrt(quad(a, gram))
    if mean_norm < eps:
        return None
    mu = [x / mean_norm for x in a]
    g_mu = matvec(gram, mu)
    along = math.fsum(weight[i] * g_mu[i] / (norms[i] + eps) for i in range(n))  # Σ wᵢ⟨uᵢ, μ⟩
    tau = [a[i] - along * mu[i] for i in range(n)]
    r = math.sqrt(quad(tau, gram)) + eps
    scale = math.fsum(norms[i] * weight[i] for i in range(n))
    return [(math.cos(r) * mu[i] + math.sin(r) / r * tau[i]) * scale for i in range(n)]


def multislerp(
    base: int | None,
    models: Sequence[int],
    *,
    weight: Sequence[float],
    normalize_weights: bool,
    eps: float,
    stats: Gram | None = None,
) -> LinearForm:
    """Barycentric SLERP of the models, or of their task vectors with a base (the result then added to it).

    Project the unit vectors onto the tangent space at their weighted mean direction, average there
    with weights wᵢ (÷ Σ wᵢ when ``normalize_weights``), map back with the exponential map, and scale
    by Σ wᵢ‖vᵢ‖. Two exactly opposed inputs fall back to Σ wᵢvᵢ; more than two raise. Given as the
    linear form Σ cᵢ·vᵢ (+ base) over the input positions.
    """
    if len(models) == 1:
        return LinearForm((models[0],), (None,))
    _need_stats("multislerp", stats)
    assert stats is not None
    w = list(weight)
    if normalize_weights:
        total = math.fsum(w)
        if total == 0:
            raise MethodInputError(
                "multislerp: the weights sum to 0 and normalize_weights divides by their sum; change them or set "
                "normalize_weights: false"
            )
        w = [x / total for x in w]
    coefficients = multislerp_coefficients(_finite_gram("multislerp", stats), w, eps)
    if coefficients is None:
        if len(models) != 2:
            raise MethodInputError(
                "multislerp: the weighted mean of the inputs' directions is zero (antipodal inputs with balancing "
                "weights), so it has no direction; use different weights"
            )
        coefficients = w
    # With a base the vectors are the task vectors mᵢ − base, and the base is added back at the end.
    return LinearForm(tuple(models), tuple(coefficients), subtract=base, anchor=base)


# ---------------------------------------------------------------------------------------------
# Karcher mean


def karcher_coefficients(gram: Gram, max_iter: int, tol: float) -> list[float]:
    """Coefficients cᵢ with result Σ cᵢvᵢ = s·u: u the Riemannian (Karcher) mean on the unit sphere of
    the directions v̂ᵢ with equal weights, s = mean ‖vᵢ‖. Inputs with ‖vᵢ‖ ≤ tol take no part in u.
    u₀ = normalised Σ αᵢv̂ᵢ; repeat (≤ max_iter): T = Σ αᵢ·θᵢ/sin θᵢ·(v̂ᵢ − cos θᵢ·u) over θᵢ ≥ tol;
    stop if ‖T‖ < tol; u ← cos‖T‖·u + sin‖T‖·T/‖T‖, renormalised (mergekit's algorithm)."""
    n = len(gram)
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    alpha = 1.0 / len(valid)
    unit = [[0.0] * n for _ in range(n)]  # v̂ᵢ as coefficients over the vᵢ
    for i in valid:
        unit[i][i] = 1.0 / norms[i]
    u = [math.fsum(alpha * unit[i][j] for i in valid) for j in range(n)]
    u_norm = math.sqrt(quad(u, gram))
    u = list(unit[valid[0]]) if u_norm < tol else [x / u_norm for x in u]
    for _ in range(max_iter):
        g_u = matvec(gram, u)
        step = [0.0] * n
        for i in valid:
            cos_i = min(1.0, max(-1.0, g_u[i] / norms[i]))
            theta = math.acos(cos_i)
            if theta < tol:
                continue
            factor = alpha * theta / math.sin(theta)
            step = [step[j] + factor * (unit[i][j] - cos_i * u[j]) for j in range(n)]
        step_norm = math.sqrt(quad(step, gram))
        if step_norm < tol:
            break
        u = [math.cos(step_norm) * u[j] + math.sin(step_norm) * step[j] / step_norm for j in range(n)]
        u_norm = math.sqrt(quad(u, gram))
        if u_norm > tol:
            u = [x / u_norm for x in u]
    scale = math.fsum(norms) / n
    return [scale * x for x in u]


def _karcher_points(base: _T | None, models: Sequence[_T]) -> list[_T]:
    # mergekit averages every input tensor, the base model's included when one is set.
    return [*models, base] if base is not None else list(models)


def karcher(
    base: int | None,
    models: Sequence[int],
    *,
    max_iter: int,
    tol: float,
    stats: Gram | None = None,
) -> LinearForm:
    """Karcher mean of the inputs' directions (``karcher_coefficients``), times their mean norm.

    All inputs weigh the same, the base model included when one is set (as in mergekit). Iterates
    at most ``max_iter`` times, until the tangent step is shorter than ``tol``. Given as the linear
    form Σ cᵢ·pᵢ over the input positions.
    """
    points = _karcher_points(base, models)
    if len(points) == 1:
        return LinearForm((points[0],), (None,))
    _need_stats("karcher", stats)
    assert stats is not None
    # max_iter is a whole number, but may be written 10.0.
    return LinearForm(tuple(points), tuple(karcher_coefficients(_finite_gram("karcher", stats), int(max_iter), tol)))


def _gram_of(vectors: Callable[[Tensor | None, Sequence[Tensor]], list[Tensor]]) -> StatisticFactory:
    return StatisticFactory(GramStatistic, lambda base, models, params: vectors(base, models))


IMPLEMENTATIONS = {
    "slerp": stats_linear_implementation(slerp, _gram_of(lambda base, models: [base, models[0]])),
    "nuslerp": Implementation(nuslerp, statistic=NuSlerpStatistic),
    "multislerp": stats_linear_implementation(multislerp, _gram_of(_nuslerp_vectors)),
    "karcher": stats_linear_implementation(karcher, _gram_of(_karcher_points)),
}
