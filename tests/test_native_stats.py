"""The native Gram kernel (kernels/stats.c) against the torch path it replaces: per-row float64 dot products
summed by ``pairwise_sum``'s tree, bit for bit, for every row length (odd, powers of two, 1) and for float32
values of every kind (subnormals, ±0, ±inf; NaN sums are NaN); and the statistic it serves gives the same Gram
matrix and the same merged tensors with and without it."""

from __future__ import annotations

import os

import pytest
import torch

from mergekitlite.methods import get_method, native_stats
from mergekitlite.methods.apply import compute_stats, merge_in_chunks, row_chunks
from mergekitlite.methods.primitives import row_sums

needs_kernel = pytest.mark.skipif(not native_stats.available(), reason="the native Gram kernel is not built here")


def test_kernel_is_built_where_required() -> None:
    if os.environ.get("MERGEKITLITE_REQUIRE_NATIVE") != "1":
        pytest.skip("MERGEKITLITE_REQUIRE_NATIVE is not set")
    assert native_stats.available(), "mergekitlite._stats did not build or is stale (pip install -e . rebuilds it)"


def _values(rows: int, cols: int, gen: torch.Generator, special: bool) -> torch.Tensor:
    """Weights of mixed magnitudes (products that round differently in other summation orders); with
    ``special``, random bit patterns too (NaN, ±inf, subnormals, ±0)."""
    x = torch.randn(rows, cols, generator=gen) * torch.exp2(torch.randint(-20, 20, (rows, cols), generator=gen))
    if special:
        bits = torch.randint(-(2**31), 2**31, (rows, cols), generator=gen, dtype=torch.int64).to(torch.int32)
        pick = torch.rand(rows, cols, generator=gen) < 0.05
        x = torch.where(pick, bits.view(torch.float32), x)
        x.view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-45, -1e-45])
    return x.contiguous()


@needs_kernel
@pytest.mark.parametrize("cols", [1, 2, 3, 5, 8, 127, 1000, 4096])
@pytest.mark.parametrize("special", [False, True])
def test_rows_equal_the_torch_tree(cols: int, special: bool) -> None:
    gen = torch.Generator().manual_seed(cols * 2 + special)
    rows = 7
    vectors = [_values(rows, cols, gen, special) for _ in range(3)]
    got = native_stats.gram_rows(vectors, rows)
    pairs = [(i, j) for i in range(3) for j in range(i, 3)]
    for idx, (i, j) in enumerate(pairs):
        want = row_sums(vectors[i].double() * vectors[j].double(), rows)
        # NaN payloads depend on the order the hardware meets NaN operands in; a NaN sum is refused by every
        # method that uses it (``spherical._finite_gram``), so only its being NaN matters.
        nan = want.isnan()
        assert torch.equal(got[idx].isnan(), nan), (cols, special, (i, j))
        assert torch.equal(got[idx][~nan].view(torch.int64), want[~nan].view(torch.int64)), (cols, special, (i, j))


@needs_kernel
def test_refuses_what_it_cannot_take() -> None:
    a = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="float32"):
        native_stats.gram_rows([a.double()], 4)
    with pytest.raises(ValueError, match="equal rows"):
        native_stats.gram_rows([a, torch.zeros(5, 3)], 4)
    assert not native_stats.supports([a.t()])  # not contiguous


@needs_kernel
@pytest.mark.parametrize("method", ["slerp", "multislerp", "karcher", "nuslerp"])
@pytest.mark.parametrize("shape", [(37, 19), (64,), ()])
def test_statistic_and_merge_are_the_same_with_and_without_it(method: str, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    base, a, b = (torch.randn(shape, generator=gen) for _ in range(3))
    models = [a] if method == "slerp" else [a, b]
    nuslerp = {"weight": [0.6, 0.4], "nuslerp_row_wise": False, "nuslerp_flatten": True}
    spec = get_method(method)
    params = {
        "slerp": {"t": 0.3},
        "multislerp": {"weight": [0.6, 0.4], "normalize_weights": True, "eps": 1e-8},
        "karcher": {"max_iter": 10, "tol": 1e-5},
        "nuslerp": nuslerp,
    }[method]
    chunks = list(row_chunks(shape, 5, 0))

    def load(c):
        if not shape:
            return base, models
        return base[c.row_start : c.row_end], [m[c.row_start : c.row_end] for m in models]

    fast = compute_stats(spec, shape, params, len(models), chunks, load, native=True)
    slow = compute_stats(spec, shape, params, len(models), chunks, load, native=False)
    assert fast == slow
    merged = merge_in_chunks(spec, base, models, params, rows_per_chunk=5)
    whole = merge_in_chunks(spec, base, models, params)
    assert torch.equal(merged.view(torch.int32), whole.view(torch.int32))


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 7, 300, 2048])
def test_fiber_ranks_equal_the_sorting_path(n: int) -> None:
    """DELLA's ranks within a row by the radix kernel: the same values as ``by_fiber_rank``'s sort, with many
    equal magnitudes (bf16-rounded), zeros, +inf and NaNs of different payloads."""
    from mergekitlite.methods.sparsify import by_fiber_rank

    gen = torch.Generator().manual_seed(n)
    magnitude = torch.randn(9, n, generator=gen).abs().to(torch.bfloat16).float()
    magnitude[1, : n // 2] = 0.0
    magnitude.view(-1)[:: max(1, n // 3)] = torch.inf
    nan_bits = torch.tensor([0x7FC00000, 0x7F800001, 0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    magnitude[2, :3] = nan_bits[: min(3, n)] if n >= 3 else nan_bits[:n]
    values = torch.randint(0, 1 << 53, (n,), generator=gen)
    want = by_fiber_rank(magnitude, values, native=False)
    got = native_stats.fiber_rank_values(magnitude, values)
    assert torch.equal(got, want)
    assert torch.equal(by_fiber_rank(magnitude, values), want)  # the native path is the default


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_variance_keys_equal_the_torch_path(m: int) -> None:
    """SCE's keys by the kernel: the bits of ``variance_key``'s float64 arithmetic for deltas of every magnitude
    (zeros, ±0, subnormals, near float32's maximum, exact ties); a NaN variance (a NaN or inf delta) declines."""
    from mergekitlite.methods.sparsify import variance_key

    gen = torch.Generator().manual_seed(m)
    scale = torch.exp2(torch.randint(-60, 60, (33, 257), generator=gen).float())
    deltas = [(torch.randn(33, 257, generator=gen) * scale).to(torch.bfloat16).float() for _ in range(m)]
    deltas[0][0, :5] = torch.tensor([0.0, -0.0, 1e-45, -3e38, 3e38])
    deltas[-1][1] = deltas[0][1]  # equal deltas: variance exactly 0 where m == 1, ties otherwise
    got = native_stats.variance_keys(deltas)
    assert got is not None and torch.equal(got, variance_key(deltas))
    for bad in (torch.nan, torch.inf):
        broken = [d.clone() for d in deltas]
        broken[0][5, 7] = bad
        assert native_stats.variance_keys(broken) is None
    assert native_stats.variance_keys([deltas[0], deltas[0][:, :3].contiguous()]) is None  # shapes differ


WHOLE_MERGES = {
    # method: (models' parameters, merge parameters, the kernel its native path calls)
    "della": (
        ["{weight: 0.6, density: 0.5, epsilon: 0.1}", "{weight: 0.4, density: 0.7, epsilon: 0.2}"],
        "{}",
        "fiber_rank_values",
    ),
    "sce": (["{}", "{}"], "{select_topk: 0.3}", "variance_keys"),
}


@needs_kernel
@pytest.mark.parametrize("method", sorted(WHOLE_MERGES))
def test_whole_merges_are_the_same_with_and_without_the_kernel(
    method: str, llama_family, tmp_path, write_recipe, monkeypatch
) -> None:
    """DELLA ranks and SCE computes its variance keys with the kernel by default, with torch under --no-native:
    the same bytes."""
    from builders import assert_native_merge_equals_torch

    fam = {k: str(v) for k, v in llama_family.items()}
    models, parameters, kernel = WHOLE_MERGES[method]
    listed = "".join(
        f"\n          - model: {fam[name]}\n            parameters: {p}" for name, p in zip(("a", "b"), models)
    )
    recipe = write_recipe(
        f"""
        merge_method: {method}
        base_model: {fam["base"]}
        models:{listed}
        parameters: {parameters}
        dtype: bfloat16
        """
    )
    assert_native_merge_equals_torch(recipe, tmp_path, monkeypatch, native_stats, kernel)
