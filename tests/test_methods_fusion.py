"""Arcee Fusion against a plain-torch reference of mergekit's definition (whole tensors, float64 softmax and
log, quantiles by sorting), its exp/log/KL against higher precision, exact quantiles over chunks in any
order, any chunking, and one end-to-end merge through the public API."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from builders import load_tensors
from torch import Tensor

from mergekitlite import MergeOptions, run_merge
from mergekitlite.methods import ChunkInfo, get_method
from mergekitlite.methods.apply import compute_stats, merge_in_chunks, row_chunks
from mergekitlite.methods.fusion import (
    FusionStats,
    Quantiles,
    ceil_key,
    exp_nonpositive,
    fiber_kl,
    key_value,
    log_positive,
    quantile_positions,
)

SPEC = get_method("arcee_fusion")
NAN_KEY = 0x7F800001


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def bits(x: Tensor) -> Tensor:
    return x.reshape(-1).view(torch.int32)


def checkpoint_pair(shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    """bf16-valued base and fine-tune whose difference varies in size from fiber to fiber (so do the KLs),
    with some elements left unchanged (importance 0), as in real checkpoints."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen).bfloat16().float()
    scale = torch.rand((*shape[:-1], 1) if len(shape) > 1 else (), generator=gen) * 0.2 + 0.01
    step = torch.randn(shape, generator=gen) * scale
    step[torch.rand(shape, generator=gen) < 0.1] = 0.0
    return base, (base + step).bfloat16().float()


class Reference(NamedTuple):
    result: Tensor
    importance: Tensor
    kl: Tensor
    quantiles: tuple[float, float, float]
    threshold: float


def reference(base: Tensor, model: Tensor, kl: Tensor | None = None) -> Reference:
    """mergekit's arcee_fusion written out on whole tensors: KL(softmax(m) + 1e-8 ‖ softmax(b) + 1e-8) along the
    last dim in float64 (torch's softmax and log) rounded to float32 unless given, importance |m − b|·KL in
    float32, quantiles sorted[⌊q·(N − 1)⌋] of the sorted importances, threshold and comparison in float64."""
    if kl is None:
        p = torch.softmax(model.double(), dim=-1) + 1e-8
        q = torch.softmax(base.double(), dim=-1) + 1e-8
        kl = (p * torch.log(p / q)).sum(dim=-1).float()
    importance = (model - base).abs() * kl.unsqueeze(-1)
    ordered = torch.sort(importance.reshape(-1).double()).values
    last = ordered.numel() - 1
    median, q1, q3 = (float(ordered[math.floor(q * last)]) for q in (0.5, 0.25, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    mask = importance.double() >= threshold
    return Reference(base + (model - base) * mask.float(), importance, kl, (median, q1, q3), threshold)


def stats_of(base: Tensor, model: Tensor, rows: int | None = None) -> FusionStats:
    shape = tuple(base.shape)
    chunks = list(row_chunks(shape, rows or (shape[0] if shape else 1), seed=0))

    def load(c: ChunkInfo) -> tuple[Tensor, list[Tensor]]:
        if not shape:
            return base, [model]
        return base[c.row_start : c.row_end], [model[c.row_start : c.row_end]]

    return compute_stats(SPEC, shape, {}, 1, chunks, load)


def run(base: Tensor, model: Tensor, rows: int | None = None, **how: object) -> Tensor:
    return merge_in_chunks(SPEC, base, [model], {}, rows_per_chunk=rows, seed=0, **how)


def table_kl(stats: FusionStats, shape: tuple[int, ...]) -> Tensor:
    """The statistic's per-fiber KLs, shaped as the reference's."""
    return stats.table.kl.reshape(shape[:-1] if len(shape) > 1 else ())


# ---------------------------------------------------------------------------------------------
# exp, log and the KL against higher precision


def test_exp_is_within_an_ulp_or_two_of_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([-torch.rand(200_000, generator=gen, dtype=torch.float64) * 64, torch.tensor([0.0, -1e-300, -64.0])])
    want = torch.exp(x)
    got = exp_nonpositive(x.clone())
    assert float(((got - want) / want).abs().max()) < 1e-15
    assert float(exp_nonpositive(torch.tensor([0.0], dtype=torch.float64))) == 1.0
    assert math.isnan(float(exp_nonpositive(torch.tensor([math.nan], dtype=torch.float64))))


def test_log_is_within_an_ulp_or_two_of_torch() -> None:
    gen = torch.Generator().manual_seed(1)
    wide = torch.exp(torch.rand(200_000, generator=gen, dtype=torch.float64) * 44 - 22)  # the KL's ratios: 1e-8..1e8
    near_one = 1 + (torch.rand(200_000, generator=gen, dtype=torch.float64) - 0.5) * 1e-6
    for y in (wide, near_one, torch.tensor([1.0, 2.0, 0.5, math.sqrt(2.0), 1e-8, 1e8], dtype=torch.float64)):
        want = torch.log(y)
        got = log_positive(y.clone())
        error = (got - want).abs() / want.abs().clamp(min=1e-300)
        assert float(error.max()) < 1e-15
    assert float(log_positive(torch.tensor([1.0], dtype=torch.float64))) == 0.0


def extended_kl(model: Tensor, base: Tensor) -> np.ndarray:
    """The KL of each row in numpy's long double (64-bit significands on x86), from the inputs."""

    def softmax(x: Tensor) -> np.ndarray:
        wide = x.double().numpy().astype(np.longdouble)
        e = np.exp(wide - wide.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True) + np.longdouble(1e-8)

    p, q = softmax(model), softmax(base)
    return (p * np.log(p / q)).sum(axis=-1)


@pytest.mark.parametrize("step", [1e-1, 1e-2, 1e-3])
def test_fiber_kl_is_the_correctly_rounded_kl(step: float) -> None:
    # A fine-tune's small differences make the KL 10⁴–10⁶ times smaller than its terms: float64 with
    # accurate exp and log still gets it to float32 precision.
    gen = torch.Generator().manual_seed(2)
    base = (torch.randn(64, 1000, generator=gen) * 0.02).bfloat16().float()
    model = (base + torch.randn(64, 1000, generator=gen) * 0.02 * step).bfloat16().float()
    got = fiber_kl(model, base).double().numpy()
    want = extended_kl(model, base)
    assert (want > 0).all()
    error = np.abs(got - want) / want
    assert float(error.max()) <= 2.0**-24 + 1e-9  # float32's rounding, and float64's error around it


def test_fiber_kl_special_rows() -> None:
    rows = torch.tensor(
        [
            [0.5, -1.0, 2.0, 0.0],  # equal rows: KL 0
            [0.5, -1.0, 2.0, 0.0],  # model has NaN
            [0.5, -1.0, 2.0, 0.0],  # base has +inf
            [0.5, -1.0, 2.0, 0.0],  # base has NaN
            [0.5, -1.0, 2.0, -math.inf],  # −inf in the model: that p is 1e-8, finite KL
        ]
    )
    model = rows.clone()
    base = rows.clone()
    model[1, 2] = math.nan
    base[2, 0] = math.inf
    base[3, 3] = math.nan
    base[4, 3] = -5.0
    kl = fiber_kl(model, base)
    assert kl.dtype == torch.float32
    assert bits(kl[:1]).item() == 0  # +0.0
    assert kl[1:4].isnan().all()
    assert math.isfinite(float(kl[4])) and float(kl[4]) > 0
    assert torch.equal(fiber_kl(torch.ones(3, 1), torch.zeros(3, 1)), torch.zeros(3))  # one element: p = q


# ---------------------------------------------------------------------------------------------
# Exact quantiles


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 100, 1001, 70_000])
def test_quantiles_are_exact_order_statistics(n: int, pool: ThreadPoolExecutor) -> None:
    rng = random.Random(n)
    # Few distinct keys (ties everywhere), spread over the whole range and across histogram bins, with +inf and NaN.
    palette = [rng.randrange(0, 0x7F800000) for _ in range(max(2, n // 7))] + [0, 0x7F800000, NAN_KEY, 65535, 65536]
    keys = torch.tensor([rng.choice(palette) for _ in range(n)], dtype=torch.int32)
    positions = quantile_positions(n)
    want = [int(torch.sort(keys).values[j]) for j in positions]
    assert positions == tuple(math.floor(q * (n - 1)) for q in (0.5, 0.25, 0.75))
    for size in (1, 3, n) if n <= 1001 else (997, 4099, n):
        chunks = [keys[s : s + size] for s in range(0, n, size)]
        rng.shuffle(chunks)
        quantiles = Quantiles(n, n, positions)
        list(pool.map(quantiles.count_high, chunks))
        quantiles.settle_high()
        assert quantiles.wants_low == (n > 2)
        if quantiles.wants_low:
            list(pool.map(quantiles.count_low, chunks))
            quantiles.settle_low()
        assert quantiles.selected() == want, f"n={n} chunk size {size}"


def test_threshold_key_is_the_smallest_float32_not_below_the_threshold() -> None:
    for threshold in (0.0, 1e-45, 0.1, 1.0, 3.0000001, 1e-20 / 3, 3.4e38, 3.5e38, math.inf):
        key = ceil_key(threshold)
        assert key_value(key) >= threshold
        assert key == 0 or key_value(key - 1) < threshold
    assert ceil_key(math.nan) == NAN_KEY


# ---------------------------------------------------------------------------------------------
# The method against the reference

# (shape, seed) of the test data; the chosen ones keep 3–19% of the differences.
EXACT_CASES = [((37, 29), 1), ((64, 200), 2), ((29,), 3), ((500,), 3), ((5, 6, 7), 1)]
REFERENCE_CASES = [((37, 29), 1), ((64, 200), 2), ((29,), 3), ((500,), 1), ((5, 6, 7), 1)]


@pytest.mark.parametrize(("shape", "seed"), EXACT_CASES)
def test_statistic_and_mask_are_the_definition_exactly(shape: tuple[int, ...], seed: int) -> None:
    # Given the statistic's own KLs, everything after them is exact: the same float32 importances, the
    # same order statistics, threshold and mask, and so the same bits.
    base, model = checkpoint_pair(shape, seed)
    stats = stats_of(base, model)
    want = reference(base, model, kl=table_kl(stats, shape))
    assert stats.quantiles == want.quantiles
    assert stats.threshold == want.threshold
    kept = (want.result != base).float().mean()
    assert 0.005 < float(kept) < 0.5, "test data must keep some differences and drop others"
    assert torch.equal(bits(run(base, model)), bits(want.result))


def test_an_importance_equal_to_the_threshold_is_kept() -> None:
    # In this data median + 1.5·IQR, computed in float64, is exactly one element's importance.
    base, model = checkpoint_pair((500,), seed=3)
    stats = stats_of(base, model)
    importance = reference(base, model, kl=table_kl(stats, (500,))).importance
    at = (importance.double() == stats.threshold).nonzero().reshape(-1)
    assert at.numel() == 1 and float(importance[at]) == key_value(stats.threshold_key)
    got = run(base, model)
    assert float(got[at]) == float(model[at]) != float(base[at])


@pytest.mark.parametrize(("shape", "seed"), REFERENCE_CASES)
def test_merge_equals_the_plain_torch_reference(shape: tuple[int, ...], seed: int) -> None:
    base, model = checkpoint_pair(shape, seed)
    want = reference(base, model)
    got_kl = table_kl(stats_of(base, model), shape)
    assert torch.allclose(got_kl.double(), want.kl.double(), rtol=1e-6, atol=0.0)
    # torch's float64 softmax/log and ours may round a KL to neighbouring float32 values; then importances move
    # by an ulp. None lies that close to the threshold in this data, so the masks must agree exactly.
    margin = float(((want.importance.double() - want.threshold).abs() / want.threshold).min())
    assert margin > 1e-5, "test data has an importance within rounding of the threshold"
    assert torch.equal(bits(run(base, model)), bits(want.result))


@pytest.mark.parametrize("shape", [(), (1,), (2,), (3,), (4,), (5,), (1, 1), (2, 1), (1, 3), (2, 2), (3, 0)])
def test_tiny_and_empty_tensors(shape: tuple[int, ...]) -> None:
    # N ≤ 4 makes some quantile the smallest importance (TopK's k = N): the minimum is taken instead.
    base, model = checkpoint_pair(shape, seed=sum(shape) + 7) if math.prod(shape) else (torch.zeros(shape),) * 2
    got = run(base, model)
    assert got.shape == torch.Size(shape) and got.dtype == torch.float32
    if math.prod(shape):
        stats = stats_of(base, model)
        assert torch.equal(bits(got), bits(reference(base, model, kl=table_kl(stats, shape)).result))


def test_non_finite_inputs_follow_the_definition() -> None:
    base, model = checkpoint_pair((12, 9), seed=5)
    model[1, 3] = math.nan  # NaN KL for the row: never kept
    base[2, 0] = math.inf
    model[3, 4] = -math.inf  # an infinite difference
    base[4] = model[4]  # KL 0: importance 0
    stats = stats_of(base, model)
    kl = table_kl(stats, (12, 9))
    assert kl[1:3].isnan().all() and float(kl[4]) == 0.0
    want = reference(base, model, kl=kl)
    got = run(base, model)
    assert torch.equal(got.isnan(), want.result.isnan())
    assert torch.equal(bits(torch.nan_to_num(got)), bits(torch.nan_to_num(want.result)))


# ---------------------------------------------------------------------------------------------
# Any chunking, order and threads


@pytest.mark.parametrize("shape", [(37, 29), (29,), (6, 5, 4)])
def test_chunkings_orders_and_threads_give_the_same_bits(shape: tuple[int, ...], pool: ThreadPoolExecutor) -> None:
    base, model = checkpoint_pair(shape, seed=11)
    whole = run(base, model)
    for rows in (1, 3, shape[0]):
        assert torch.equal(bits(run(base, model, rows)), bits(whole)), f"{rows} rows per chunk"
        assert torch.equal(bits(run(base, model, rows, shuffle_seed=rows)), bits(whole)), f"{rows}, shuffled"
        got = run(base, model, rows, pool=pool, window=8, shuffle_seed=3)
        assert torch.equal(bits(got), bits(whole)), f"{rows}, threads"


def test_small_tensors_skip_the_second_histogram_pass() -> None:
    passes = []
    for n in (1, 2, 3):
        stat = SPEC.statistic()
        state = stat.begin((n,), 1, {})
        p = 0
        base, model = checkpoint_pair((n,), seed=n)
        while p < stat.passes:
            stat.update(state, p, base, [model], {}, next(row_chunks((n,), n, 0)))
            stat.finish_pass(state, p)
            p += 1
        passes.append(p)
    assert passes == [2, 2, 3]  # softmax + high; + low once a quantile is not the minimum


# ---------------------------------------------------------------------------------------------
# End to end


def test_merge_through_the_api(
    llama_family: dict[str, Path], write_recipe: Callable[[str], Path], tmp_path: Path
) -> None:
    fam = llama_family
    recipe = write_recipe(
        f"""
        merge_method: arcee_fusion
        base_model: {fam["base"]}
        models:
          - model: {fam["base"]}
          - model: {fam["a"]}
        dtype: bfloat16
        """
    )
    out = tmp_path / "out"
    run_merge(recipe, out, MergeOptions(hash_inputs=False))
    result, base, model = (load_tensors(p) for p in (out, fam["base"], fam["a"]))
    assert set(result) == set(base)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        b, m = base[name].float(), model[name].float()
        want = reference(b, m)
        assert float(((want.importance.double() - want.threshold).abs() / want.threshold).min()) > 1e-5, name
        if b.dim() == 2:
            assert (want.result != b).any() and (want.result == b).any(), f"{name}: a trivial mask tests little"
        assert torch.equal(result[name], want.result.to(torch.bfloat16)), name
