"""RAM and RAM+ (tensor-local) against hand-worked results and an independent whole-tensor float32 reference.

The reference follows the order of operations documented in ``mergekitlite.methods.ram`` with plain torch
(boolean masks, ``where``): tᵢ = δᵢ·λᵢ where model i alone is non-zero, δᵢ / count where several are, 0
elsewhere; ((t₀ + t₁) + …) + base. It must agree bit for bit, however the tensor is cut into rows.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import assert_bitwise, load_tensors
from torch import Tensor

from mergekitlite import MergeOptions, run_merge
from mergekitlite.methods import get_method
from mergekitlite.methods.apply import compute_stats, merge_in_chunks, row_chunks
from mergekitlite.methods.ram import RamCounts, nonzero_mask, reinforcement


def ram(base: Tensor, models: list[Tensor], rows: int | None = None, **params: Any) -> Tensor:
    return merge_in_chunks(get_method("ram"), base, models, {"epsilon": 1e-5, **params}, rows_per_chunk=rows)


def ramplus(base: Tensor, models: list[Tensor], rows: int | None = None, **params: Any) -> Tensor:
    full = {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5, **params}
    return merge_in_chunks(get_method("ramplus_tl"), base, models, full, rows_per_chunk=rows)


def counts(base: Tensor, models: list[Tensor], epsilon: float = 1e-5, rows: int = 1) -> RamCounts:
    spec = get_method("ramplus_tl")
    chunks = list(row_chunks(tuple(base.shape), rows, 0))

    def load(c: Any) -> tuple[Tensor, list[Tensor]]:
        return base[c.row_start : c.row_end], [m[c.row_start : c.row_end] for m in models]

    params = {"r": 0.1, "alpha": 0.2, "epsilon": epsilon}
    return compute_stats(spec, tuple(base.shape), params, len(models), chunks, load)


def reference(
    base: Tensor, models: list[Tensor], *, epsilon: float = 1e-5, plus: dict[str, float] | None = None
) -> Tensor:
    """Whole-tensor float32 reference, written from the definition; ``plus``: ramplus_tl's r and alpha."""
    deltas = [m - base for m in models]
    nonzero = [d.abs() > epsilon for d in deltas]
    count = torch.stack(nonzero).sum(0)
    unique, overlap = count == 1, count > 1
    terms = []
    for d, nz in zip(deltas, nonzero, strict=True):
        lam = 1.0
        if plus is not None:
            shared_i, unique_i = int((nz & overlap).sum()), int((nz & unique).sum())
            rho = shared_i / max(unique_i, epsilon)
            lam = 1.0 + plus["r"] * min(max(rho, 0.0), plus["alpha"])
        kept = d * torch.tensor(lam, dtype=torch.float32)
        averaged = d / count.to(torch.float32)
        terms.append(torch.where(nz & unique, kept, torch.where(nz & overlap, averaged, torch.zeros_like(d))))
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total + base


def bits(x: Tensor) -> Tensor:
    return x.reshape(-1).view(torch.int32)


# ---------------------------------------------------------------------------------------------
# Hand-worked cases


def test_ram_by_hand() -> None:
    base = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = base + torch.tensor([[0.5, 0.0, 1.0, 3.0], [0.0, -1.0, 0.0, 0.25]])
    b = base + torch.tensor([[0.0, 0.0, 2.0, -1.0], [0.0, 0.0, 0.0, 0.5]])
    c = base + torch.tensor([[0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 4.0, 0.75]])
    # col 0: a alone; col 1: no one (row 0), a alone (row 1); col 2: a, b, c overlap → (1+2+3)/3 = 2,
    # c alone (row 1); col 3: a, b overlap → (3 − 1)/2, then all three → (0.25+0.5+0.75)/3 = 0.5
    expected = torch.tensor([[1.5, 1.0, 3.0, 2.0], [2.0, 1.0, 6.0, 2.5]])
    for rows in (None, 1):
        assert torch.equal(ram(base, [a, b, c], rows), expected)
    # Two models: a's 0.5 stays unique, overlaps of two halve.
    assert torch.equal(ram(base, [a, b])[0], torch.tensor([1.5, 1.0, 2.5, 2.0]))
    # One model: every non-zero entry is unique, so the result is the model (where |δ| > ε).
    assert torch.equal(ram(base, [a]), a)


def test_epsilon_is_a_strict_threshold() -> None:
    base = torch.zeros(5)
    # |δ| = 0.5 exactly equals ε: not non-zero, so b's 0.5 at index 0 does not overlap a's 1.0.
    a = torch.tensor([1.0, 1.0, 0.5, -0.5, 0.0])
    b = torch.tensor([0.5, 1.0, -0.75, 0.0, 0.5])
    assert torch.equal(ram(base, [a, b], epsilon=0.5), torch.tensor([1.0, 1.0, -0.75, 0.0, 0.0]))
    # Just above ε it counts.
    above = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0))
    b2 = b.clone()
    b2[0] = above
    got = ram(base, [a, b2], epsilon=0.5)
    assert float(got[0]) == float((1.0 + above) / 2)
    # The default ε = 1e-5 is compared in float32: |δ| = float32(1e-5) is not non-zero, the next float is.
    eps32 = torch.tensor(1e-5, dtype=torch.float32)
    deltas = torch.stack([eps32, torch.nextafter(eps32, torch.tensor(1.0))])
    assert torch.equal(ram(torch.zeros(2), [deltas]), torch.tensor([0.0, float(deltas[1])]))
    # ε ≤ 0: every element (even δ = 0) counts for ε < 0; for ε = 0 only δ ≠ 0 does.
    z = torch.tensor([0.0, 2.0])
    one = torch.tensor([0.0, 4.0])
    assert torch.equal(ram(torch.zeros(2), [z, one], epsilon=0.0), torch.tensor([0.0, 3.0]))
    assert torch.equal(ram(torch.zeros(2), [z, one], epsilon=-1.0), torch.tensor([0.0, 3.0]))


def test_nonzero_mask_matches_the_comparison_on_special_values() -> None:
    x = torch.tensor([0.0, -0.0, 1e-5, -1e-5, 2e-5, float("inf"), -float("inf"), float("nan"), 1e-40, -3.0])
    for eps in (1e-5, 0.0, -0.0, -1.0, 1e-40, float("inf"), float("nan"), 3.0):
        expected = x.abs() > eps
        got = nonzero_mask(x.clone(), eps)
        assert torch.equal(got != 0, expected), eps
        assert set(got.tolist()) <= {0, -1}
        assert torch.equal(nonzero_mask(x.double(), eps) != 0, x.double().abs() > eps), eps


def test_reinforcement_by_hand() -> None:
    # ρ = 3/4 → clamped to alpha 0.2 → λ = 1 + 0.1·0.2
    assert reinforcement(3, 4, r=0.1, alpha=0.2, epsilon=1e-5) == 1.0 + 0.1 * 0.2
    # ρ = 1/10 below alpha: λ = 1 + 0.5·0.1
    assert reinforcement(1, 10, r=0.5, alpha=0.2, epsilon=1e-5) == 1.0 + 0.5 * (1 / 10)
    # unique = 0: ρ = shared/ε is huge → alpha
    assert reinforcement(5, 0, r=0.1, alpha=0.2, epsilon=1e-5) == 1.0 + 0.1 * 0.2
    # nothing shared: λ = 1; ε ≤ 0 with nothing unique does not divide by zero
    assert reinforcement(0, 7, r=0.1, alpha=0.2, epsilon=1e-5) == 1.0
    assert reinforcement(0, 0, r=0.1, alpha=0.2, epsilon=0.0) == 1.0
    assert reinforcement(2, 0, r=0.1, alpha=0.2, epsilon=0.0) == 1.0 + 0.1 * 0.2


def test_ramplus_counts_and_result_by_hand() -> None:
    base = torch.zeros(2, 5)
    # a: non-zero at (0,0) (0,1) (0,2) (1,0) (1,1); b: (0,1) (1,1) (1,4); c: (0,2) only.
    a = torch.tensor([[1.0, 2.0, 4.0, 0.0, 0.0], [8.0, 16.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 4.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0, 32.0]])
    c = torch.tensor([[0.0, 0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    # a: shared 3 ((0,1), (0,2), (1,1)), unique 2 → ρ 1.5 → alpha 0.2; b: shared 2, unique 1 → 2 → 0.2;
    # c: shared 1, unique 0 → ρ = 1/ε, clamped to alpha (and unused: c has no unique entries).
    for rows in (1, 2):
        stats = counts(base, [a, b, c], rows=rows)
        assert (stats.shared, stats.unique) == ([3, 2, 1], [2, 1, 0])
    la = torch.tensor(1.0 + 0.1 * 0.2, dtype=torch.float32)
    lb = la
    expected = torch.tensor(
        [
            [1.0 * la, (2.0 + 4.0) / 2, (4.0 + 2.0) / 2, 0.0, 0.0],
            [8.0 * la, (16.0 + 2.0) / 2, 0.0, 0.0, 32.0 * lb],
        ]
    )
    assert torch.equal(ramplus(base, [a, b, c]), expected)
    # With r = 1 and alpha = 2: λ_a = 1 + 1.5, λ_b = 1 + 2.
    expected[0, 0], expected[1, 0], expected[1, 4] = 2.5, 20.0, 96.0
    assert torch.equal(ramplus(base, [a, b, c], r=1.0, alpha=2.0), expected)
    # r = 0 is plain RAM.
    assert torch.equal(ramplus(base, [a, b, c], r=0.0), ram(base, [a, b, c]))


# ---------------------------------------------------------------------------------------------
# Random tensors: bitwise against the reference, for any chunking and concurrent statistics


def random_inputs(shape: tuple[int, ...], n: int, seed: int) -> tuple[Tensor, list[Tensor]]:
    """bf16-valued checkpoints whose deltas are often exactly zero (a fine-tune touches only part of a
    tensor), sometimes tiny (around ε), so unique, overlapping and unchanged entries all occur."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).bfloat16().float()
    models = []
    for _ in range(n):
        delta = 0.05 * torch.randn(shape, generator=g)
        keep = torch.rand(shape, generator=g) < 0.4
        tiny = torch.rand(shape, generator=g) < 0.1
        delta = torch.where(keep, delta, torch.zeros_like(delta))
        delta = torch.where(tiny, 1e-5 * torch.randn(shape, generator=g), delta)
        models.append((base + delta).bfloat16().float())
    return base, models


CONFIGS = [
    ("ram", {"epsilon": 1e-5}),
    ("ram", {"epsilon": 0.01}),
    ("ramplus_tl", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
    ("ramplus_tl", {"r": 0.7, "alpha": 3.0, "epsilon": 0.02}),
]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize(("method", "params"), CONFIGS)
def test_random_tensors_match_the_reference_bitwise(method: str, params: dict[str, float], n: int) -> None:
    spec = get_method(method)
    plus = {"r": params["r"], "alpha": params["alpha"]} if "r" in params else None
    for shape in [(37, 29), (11,), (), (3, 4, 5)]:
        base, models = random_inputs(shape, n, seed=n * 100 + len(shape))
        expected = reference(base, models, epsilon=params["epsilon"], plus=plus)
        whole = merge_in_chunks(spec, base, models, params)
        assert torch.equal(bits(whole), bits(expected)), f"{method} {shape}"
        for rows in (1, 3, 8) if shape else ():
            sliced = merge_in_chunks(spec, base, models, params, rows_per_chunk=rows)
            assert torch.equal(bits(sliced), bits(expected)), f"{method} {shape} rows={rows}"


def test_reinforcement_changes_the_result() -> None:
    # Guards the random comparison above against a λ that never leaves 1.
    base, models = random_inputs((37, 29), 3, seed=5)
    params = {"r": 0.7, "alpha": 3.0, "epsilon": 1e-5}
    plus = merge_in_chunks(get_method("ramplus_tl"), base, models, params)
    plain = merge_in_chunks(get_method("ram"), base, models, {"epsilon": 1e-5})
    assert not torch.equal(plus, plain)
    stats = counts(base, models)
    assert all(s > 0 and u > 0 for s, u in zip(stats.shared, stats.unique, strict=True))


def test_concurrent_and_shuffled_statistics_give_the_same_bits() -> None:
    spec = get_method("ramplus_tl")
    base, models = random_inputs((96, 40), 3, seed=9)
    params = {"r": 0.3, "alpha": 0.5, "epsilon": 1e-5}
    expected = reference(base, models, plus={"r": 0.3, "alpha": 0.5})
    with ThreadPoolExecutor(4) as pool:
        for window, shuffle in ((2, None), (16, 4)):
            got = merge_in_chunks(
                spec, base, models, params, rows_per_chunk=1, pool=pool, window=window, shuffle_seed=shuffle
            )
            assert torch.equal(bits(got), bits(expected)), f"window {window}"


def test_float64_compute_matches_the_float64_definition() -> None:
    base, models = random_inputs((13, 7), 3, seed=2)
    base, models = base.double(), [m.double() for m in models]
    deltas = [m - base for m in models]
    nonzero = [d.abs() > 1e-5 for d in deltas]
    count = torch.stack(nonzero).sum(0).double()
    total = torch.zeros_like(base)
    for d, nz in zip(deltas, nonzero, strict=True):
        total = total + torch.where(nz, d / count, torch.zeros_like(d))
    got = ram(base, models)
    assert got.dtype == torch.float64
    assert torch.equal(got, total + base)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("method", "params"), CONFIGS)
def test_gpu_gives_the_cpu_bits(method: str, params: dict[str, float]) -> None:
    spec = get_method(method)
    plus = {"r": params["r"], "alpha": params["alpha"]} if "r" in params else None
    for shape in [(37, 29), (29,)]:
        base, models = random_inputs(shape, 3, seed=3)
        expected = reference(base, models, epsilon=params["epsilon"], plus=plus)
        gpu = merge_in_chunks(spec, base.cuda(), [m.cuda() for m in models], params, rows_per_chunk=6)
        assert gpu.is_cuda
        assert torch.equal(bits(gpu.cpu()), bits(expected)), f"{method} {shape}"


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_end_to_end(llama_family: dict[str, Path], tmp_path: Path, write_recipe: Any, method: str) -> None:
    fam = llama_family
    # ε = 0.01 against the family's 0.01-scale perturbations: unique, overlapping and unchanged entries all occur.
    settings = "  epsilon: 0.01\n" + ("  r: 0.5\n  alpha: 1.5\n" if method == "ramplus_tl" else "")
    recipe = write_recipe(
        f"merge_method: {method}\nbase_model: {fam['base']}\nmodels:\n  - model: {fam['a']}\n  - model: {fam['b']}\n"
        f"parameters:\n{settings}"
    )
    run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False))
    out = load_tensors(tmp_path / "out")
    ins = [load_tensors(fam[k]) for k in ("base", "a", "b")]
    plus = {"r": 0.5, "alpha": 1.5} if method == "ramplus_tl" else None
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        base, a, b = (t[name].float() for t in ins)
        count = ((a - base).abs() > 0.01).int() + ((b - base).abs() > 0.01).int()
        assert {0, 1, 2} <= set(count.unique().tolist()), name
        expected = reference(base, [a, b], epsilon=0.01, plus=plus)
        assert_bitwise(out[name], expected.to(out[name].dtype), name)
        if plus is not None:  # the reinforcement is visible after the cast
            plain = reference(base, [a, b], epsilon=0.01).to(out[name].dtype)
            assert not torch.equal(out[name], plain), name
