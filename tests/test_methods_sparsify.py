"""TIES, DARE, Breadcrumbs, DELLA and SCE against hand-worked results and their definitions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from mergekitlite.errors import MethodInputError
from mergekitlite.methods import get_method
from mergekitlite.methods.apply import merge_in_chunks


def run(
    name: str, base: Tensor, models: Sequence[Tensor], *, rows: int | None = None, seed: int = 0, **given: Any
) -> Tensor:
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
    return merge_in_chunks(spec, base, list(models), params, rows_per_chunk=rows, seed=seed)


def assert_close(got: Tensor, want: Tensor, *, rtol: float = 0.0, atol: float = 0.0) -> None:
    """|got − want| ≤ atol + rtol·|want| everywhere (torch.testing imports torch.distributed: seconds)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    bound = atol + rtol * want.abs()
    assert bool(((got - want).abs() <= bound).all()), f"max error {(got - want).abs().max()}"


def t(rows: list[list[float]] | list[float]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32)


BASE = t([[1, 2, 3], [4, 5, 6]])
D1 = t([[4, -1, 2], [-3, 0.5, 1]])
D2 = t([[-2, 3, 1], [-1, -4, 0.5]])


# ---------------------------------------------------------------------------------------------
# TIES


@pytest.mark.parametrize("rows", [None, 1])
def test_ties_hand_worked(rows: int | None) -> None:
    # density 0.5 of 6 elements → k = 3 per model.
    # |D1| = 4 1 2 / 3 .5 1 → keep 4, 2, −3 → trimmed T1 = [[4, 0, 2], [−3, 0, 0]]
    # |D2| = 2 3 1 / 1 4 .5 → keep −2, 3, −4 → trimmed T2 = [[−2, 3, 0], [0, −4, 0]]
    # weights 1 and 0.5 → W1 = T1, W2 = [[−1, 1.5, 0], [0, −2, 0]]
    # Σ = [[3, 1.5, 2], [−3, −2, 0]] → elected signs + + + / − − + (0 counts as +)
    # agreeing entries: W1: 4, 2, −3 ; W2: 1.5, −2
    # sums [[4, 1.5, 2], [−3, −2, 0]], agreeing weights [[1, .5, 1], [1, .5, none → 1]]
    mixed = t([[4 / 1, 1.5 / 0.5, 2 / 1], [-3 / 1, -2 / 0.5, 0]])
    out = run("ties", BASE, [BASE + D1, BASE + D2], rows=rows, weight=(1.0, 0.5), density=(0.5, 0.5))
    assert torch.equal(out, BASE + mixed)
    raw = run("ties", BASE, [BASE + D1, BASE + D2], rows=rows, weight=(1.0, 0.5), density=(0.5, 0.5), normalize=False)
    assert torch.equal(raw, BASE + t([[4, 1.5, 2], [-3, -2, 0]]))
    scaled = run("ties", BASE, [BASE + D1, BASE + D2], weight=(1.0, 0.5), density=(0.5, 0.5), **{"lambda": 0.5})
    assert torch.equal(scaled, BASE + mixed * 0.5)


def test_ties_density_one_is_sign_elected_mean_of_full_deltas() -> None:
    # No trimming. W1 = D1, W2 = 0.5·D2 = [[−1, 1.5, .5], [−.5, −2, .25]]
    # Σ = [[3, .5, 2.5], [−3.5, −1.5, 1.25]] → signs + + + / − − +
    # agreeing: (0,0) W1 only; (0,1) W2 only; (0,2) both; (1,0) both; (1,1) W2 only; (1,2) both
    w1, w2 = 1.0, 0.5
    expected = t(
        [
            [4 / w1, (3 * w2) / w2, (2 + 1 * w2) / (w1 + w2)],
            [(-3 - 1 * w2) / (w1 + w2), (-4 * w2) / w2, (1 + 0.5 * w2) / (w1 + w2)],
        ]
    )
    out = run("ties", BASE, [BASE + D1, BASE + D2], weight=(w1, w2))
    assert_close(out, BASE + expected, rtol=0, atol=1e-6)


def test_ties_ties_at_threshold_keep_lowest_flat_indices() -> None:
    delta = t([[1, 2, 2], [-2, 0, 3]])  # k = 3: 3 is in; three 2s compete for two places: flat 1 and 2 win
    for rows in (None, 1):
        out = run("ties", BASE, [BASE + delta], rows=rows, weight=(1.0,), density=(0.5,))
        assert torch.equal(out - BASE, t([[0, 2, 2], [0, 0, 3]]))


def test_ties_edge_cases() -> None:
    # density 0: nothing survives (mergekit refuses k = 0); all-zero task vector; a single model.
    assert torch.equal(run("ties", BASE, [BASE + D1], weight=(1.0,), density=(0.0,)), BASE)
    assert torch.equal(run("ties", BASE, [BASE.clone(), BASE.clone()], weight=(1.0, 1.0), density=(0.5, 0.5)), BASE)
    assert torch.equal(run("ties", BASE, [BASE + D1], weight=(0.25,)), BASE + D1)
    # opposite signs of equal mass: + is elected (Σ = 0), so only the positive entries remain
    out = run("ties", BASE, [BASE + D1, BASE - D1], weight=(1.0, 1.0))
    assert torch.equal(out, BASE + D1.abs())


def test_ties_rescale_restores_l1_norm() -> None:
    # one model, weight 1: result − base = trimmed δ · ‖δ‖₁/‖trimmed‖₁ = [4, 2, −3]·16.5/9
    out = run("ties", BASE, [BASE + D1], weight=(1.0,), density=(0.5,), rescale=True)
    factor = (4 + 1 + 2 + 3 + 0.5 + 1) / (4 + 2 + 3)
    assert_close(out - BASE, t([[4, 0, 2], [-3, 0, 0]]) * factor, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# DARE


def big_pair(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(200, 500, generator=gen)
    return base, base + torch.randn(200, 500, generator=gen)


def test_dare_density_one_equals_task_arithmetic() -> None:
    out = run("dare_linear", BASE, [BASE + D1, BASE + D2], weight=(1.0, 0.5), density=(1.0, 1.0))
    assert torch.equal(out, BASE + (D1 * 1.0 + D2 * 0.5))
    ties_like = run("dare_ties", BASE, [BASE + D1, BASE + D2], weight=(1.0, 0.5), density=(1.0, 1.0), normalize=True)
    plain_ties = run("ties", BASE, [BASE + D1, BASE + D2], weight=(1.0, 0.5), density=(1.0, 1.0))
    assert torch.equal(ties_like, plain_ties)


def test_dare_density_zero_and_zero_delta_give_base() -> None:
    assert torch.equal(run("dare_linear", BASE, [BASE + D1], weight=(1.0,), density=(0.0,)), BASE)
    assert torch.equal(run("dare_ties", BASE, [BASE.clone()], weight=(1.0,), density=(0.5,)), BASE)


def test_dare_seeds() -> None:
    base, model = big_pair()
    a = run("dare_linear", base, [model], seed=7, weight=(1.0,), density=(0.5,))
    b = run("dare_linear", base, [model], seed=7, rows=13, weight=(1.0,), density=(0.5,))
    c = run("dare_linear", base, [model], seed=8, weight=(1.0,), density=(0.5,))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # two models with the same task vector draw independent masks
    two = run("dare_linear", base, [model, model], seed=7, weight=(1.0, 1.0), density=(0.5, 0.5), rescale=False)
    single = run("dare_linear", base, [model], seed=7, weight=(2.0,), density=(0.5,), rescale=False)
    assert not torch.equal(two, single)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.9])
def test_dare_keep_rate(density: float) -> None:
    base, model = big_pair()
    out = run("dare_linear", base, [model], seed=3, weight=(1.0,), density=(density,), rescale=False)
    kept = (out != base).double().mean().item()
    assert abs(kept - density) < 0.01  # 100 000 draws: 5 standard deviations ≤ 0.0075


def test_dare_rescale_is_the_l1_ratio() -> None:
    base, model = big_pair()
    delta = (model - base).double()
    out = run("dare_linear", base, [model], seed=5, weight=(1.0,), density=(0.3,))
    kept = (out - base) != 0
    factor = delta.abs().sum() / (delta.abs() * kept).sum()  # ‖δ‖₁/‖kept δ‖₁, mergekit's rescale
    assert_close((out - base).double(), delta * kept * factor, rtol=1e-5, atol=1e-5)
    assert abs(float(factor) - 1 / 0.3) < 0.05  # close to, but not exactly, 1/density


def test_dare_is_unbiased_with_rescale() -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(8, 16, generator=gen)
    model = base + torch.randn(8, 16, generator=gen)
    runs = torch.stack([run("dare_linear", base, [model], seed=s, weight=(1.0,), density=(0.5,)) for s in range(400)])
    error = (runs.mean(0) - model).double()
    # per element: std of the mean of 400 draws of 2δ·Bernoulli(½) is |δ|/20
    assert error.abs().max() < 5 * (model - base).abs().max() / 20
    assert error.norm() < 0.1 * (model - base).double().norm()


# ---------------------------------------------------------------------------------------------
# Breadcrumbs


MAGNITUDES = [3.0, -10.0, 7.0, 1.0, -5.0, 9.0, -2.0, 6.0, 4.0, -8.0]


@pytest.mark.parametrize(
    ("density", "gamma", "kept"),
    [
        (0.5, 0.2, {4, 5, 6, 7, 8}),  # drop 2 largest (10, 9) and 3 smallest (1, 2, 3)
        (0.5, 0.0, {6, 7, 8, 9, 10}),  # no outliers: plain top-k (mergekit keeps nothing here: see README)
        (0.9, 0.2, {1, 2, 3, 4, 5, 6, 7, 8, 9}),  # density + gamma > 1: only the single largest goes
        (0.3, 0.1, {7, 8, 9}),  # drop the largest (10) and the 6 smallest
    ],
)
def test_breadcrumbs_window(density: float, gamma: float, kept: set[int]) -> None:
    delta = t(MAGNITUDES)
    base = torch.zeros(10)
    expected = torch.where(torch.tensor([abs(v) in kept for v in MAGNITUDES]), delta, 0.0)
    for rows in (None, 3):
        out = run("breadcrumbs", base, [delta], rows=rows, weight=(1.0,), density=(density,), gamma=(gamma,))
        assert torch.equal(out, expected)


def test_breadcrumbs_ties_elects_signs() -> None:
    base = torch.zeros(10)
    a = t(MAGNITUDES)
    b = -a * 0.5  # opposite, lighter: + wins where a > 0, − where a < 0 → a's entries win everywhere
    out = run("breadcrumbs_ties", base, [a, b], weight=(1.0, 1.0), density=(0.5, 0.5), gamma=(0.2, 0.2))
    expected = torch.where(torch.tensor([abs(v) in {4, 5, 6, 7, 8} for v in MAGNITUDES]), a, 0.0)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------
# DELLA


def test_della_density_one_is_unsparsified() -> None:
    out = run("della_linear", BASE, [BASE + D1, BASE + D2], weight=(1.0, 0.5), density=(1.0, 1.0))
    assert torch.equal(out, BASE + (D1 * 1.0 + D2 * 0.5))
    assert torch.equal(run("della", BASE, [BASE + D1], weight=(1.0,), density=(0.0,)), BASE)


def test_della_rejects_epsilon_outside_the_density_range() -> None:
    with pytest.raises(MethodInputError, match=r"density ± epsilon must lie inside \(0, 1\).*epsilon below 0.1"):
        run("della", BASE, [BASE + D1], weight=(1.0,), density=(0.1,), epsilon=(0.15,))


def test_della_keep_probability_rises_with_magnitude_rank_along_rows() -> None:
    rows = 4000
    # every row holds magnitudes 1..5 in a shuffled order → ranks 0..4 → p = 0.3, 0.4, 0.5, 0.6, 0.7
    gen = torch.Generator().manual_seed(2)
    order = torch.stack([torch.randperm(5, generator=gen) for _ in range(rows)])
    delta = (order + 1).float() * torch.where(torch.rand(rows, 5, generator=gen) < 0.5, -1.0, 1.0)
    base = torch.zeros(rows, 5)
    out = run("della_linear", base, [delta], seed=11, weight=(1.0,), density=(0.5,), epsilon=(0.2,), rescale=False)
    for magnitude in range(1, 6):
        where = delta.abs() == magnitude
        rate = (out[where] != 0).double().mean().item()
        assert abs(rate - (0.3 + 0.1 * (magnitude - 1))) < 0.04  # 4000 draws: std ≤ 0.008


def test_della_ranks_a_vector_as_a_whole_and_rescales() -> None:
    n = 20000
    gen = torch.Generator().manual_seed(4)
    delta = (torch.randperm(n, generator=gen) + 1).float()  # magnitudes 1..n
    base = torch.zeros(n)
    common: dict[str, Any] = {"rows": 777, "seed": 9, "weight": (1.0,), "density": (0.5,), "epsilon": (0.2,)}
    raw = run("della_linear", base, [delta], rescale=False, **common)
    low = (raw[delta <= n / 10] != 0).double().mean().item()  # ranks in the first tenth: p ≈ 0.3 … 0.34
    high = (raw[delta > 9 * n / 10] != 0).double().mean().item()  # last tenth: p ≈ 0.66 … 0.7
    assert abs(low - 0.32) < 0.04 and abs(high - 0.68) < 0.04
    rescaled = run("della_linear", base, [delta], **common)
    assert torch.equal(rescaled != 0, raw != 0)  # same draws
    assert rescaled.double().abs().sum().item() == pytest.approx(delta.double().abs().sum().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# SCE


SCE_BASE = t([[0.5, -1.0, 2.0, 0.0]])
S1 = t([[1.0, 2.0, -1.0, 0.0]])
S2 = t([[3.0, -2.0, -1.0, 2.0]])


def test_sce_without_selection() -> None:
    # mean δ²: (1 + 4 + 1 + 0)/4 = 1.5 and (9 + 4 + 1 + 4)/4 = 4.5 → ω = 0.25, 0.75
    # Σ δ = [4, 0, −2, 2] → signs + + − +; S1 agrees at 0, 1, 2; S2 at 0, 2, 3
    w1, w2 = 0.25, 0.75
    expected = t([[(1 * w1 + 3 * w2) / (w1 + w2), (2 * w1) / w1, (-1 * w1 - 1 * w2) / (w1 + w2), (2 * w2) / w2]])
    out = run("sce", SCE_BASE, [SCE_BASE + S1, SCE_BASE + S2])
    assert_close(out, SCE_BASE + expected, rtol=0, atol=1e-6)


def test_sce_selects_by_variance() -> None:
    # variances across the two models: [1, 4, 0, 1] → 3 non-zero
    # select_topk 0.5 → k = int(1.5) = 1 → only element 1 survives: S1 → [0, 2, 0, 0], S2 → [0, −2, 0, 0]
    # ω = ½, ½; Σ = 0 → + elected → only S1's 2 agrees → 2·½/½ = 2
    out = run("sce", SCE_BASE, [SCE_BASE + S1, SCE_BASE + S2], select_topk=0.5)
    assert_close(out, SCE_BASE + t([[0, 2, 0, 0]]), rtol=0, atol=1e-6)
    # select_topk 0.7 → k = 2: element 1, then elements 0 and 3 tie at variance 1 → the lower index (0)
    # S1 → [1, 2, 0, 0], S2 → [3, −2, 0, 0]; ω ∝ 5/4, 13/4 → 5/18, 13/18; signs + + + +
    w1, w2 = 5 / 18, 13 / 18
    expected = t([[(1 * w1 + 3 * w2) / (w1 + w2), 2 * w1 / w1, 0, 0]])
    for rows in (None, 1):
        out = run("sce", SCE_BASE, [SCE_BASE + S1, SCE_BASE + S2], rows=rows, select_topk=0.7)
        assert_close(out, SCE_BASE + expected, rtol=0, atol=1e-6)
    assert torch.equal(run("sce", SCE_BASE, [SCE_BASE + S1, SCE_BASE + S2], select_topk=0.0), SCE_BASE)


def test_sce_uniform_weights_for_tiny_task_vectors() -> None:
    # mean δ² = 0.5e-8 and 4.5e-8: their sum < 1e-6 → ω = ½, ½ (not 0.1, 0.9) → (1e-4 + 3e-4)/2
    base = torch.zeros(1, 2)
    out = run("sce", base, [t([[1e-4, 0.0]]), t([[3e-4, 0.0]])])
    assert_close(out, t([[2e-4, 0.0]]), rtol=1e-6, atol=0)


def test_sce_single_model_and_zero_delta() -> None:
    assert torch.equal(run("sce", SCE_BASE, [SCE_BASE.clone(), SCE_BASE.clone()]), SCE_BASE)
    assert_close(run("sce", SCE_BASE, [SCE_BASE + S1]), SCE_BASE + S1, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Whole-tensor top-k in a realistic setting: bf16-valued task vectors tie a lot


@pytest.mark.parametrize("density", [0.1, 0.5, 0.77])
def test_ties_keeps_exactly_k_of_bf16_task_vectors(density: float) -> None:
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(64, 96, generator=gen).bfloat16().float()
    model = (base + 0.02 * torch.randn(64, 96, generator=gen)).bfloat16().float()
    values = (model - base).reshape(-1).tolist()
    assert len({abs(v) for v in values}) < len(values) // 10  # bf16 task vectors: many equal magnitudes
    k = int(density * len(values))
    order = sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))  # the documented tie rule
    mask = torch.zeros(len(values), dtype=torch.bool)
    mask[order[:k]] = True
    expected = base + torch.where(mask.reshape(64, 96), model - base, 0.0)
    for rows in (None, 5):
        out = run("ties", base, [model], rows=rows, weight=(1.0,), density=(density,), normalize=False)
        assert torch.equal(out, expected)
