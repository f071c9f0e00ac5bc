"""Concurrent statistics: every statistic gives the bits of sequential whole-tensor processing when the
chunks of each pass arrive in a shuffled order or are folded in by several threads at once; passes that
turn out unneeded are skipped; and the bit-level fast paths (int32 masks, numpy hashing, composite-key
ranks) give exactly what their boolean / float definitions give, special values included."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from test_methods_chunking import VARIANTS, bits, inputs, params_for
from torch import Tensor

from mergekitlite.methods import REGISTRY, ChunkInfo
from mergekitlite.methods.apply import compute_stats, merge_in_chunks, row_chunks
from mergekitlite.methods.primitives import (
    TopK,
    _random_bits_torch,
    agreement_masks,
    bernoulli_mask,
    chunk_uniform,
    magnitude_key,
    pairwise_sum,
    random_bits,
    sign_agreement,
)
from mergekitlite.methods.sparsify import (
    SceStats,
    _agreeing_mix,
    _ranks,
    _sce_mix_by_definition,
    by_fiber_rank,
    mix,
    sce,
    variance_key,
)

STATISTIC_METHODS = sorted(name for name, spec in REGISTRY.methods.items() if spec.statistic is not None)
SHAPES = [(7, 5), (11,), (), (3, 4, 5), (6, 1), (19, 13)]


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def cases() -> Iterator[Any]:
    for name in STATISTIC_METHODS:
        for i, extra in enumerate([{}, *VARIANTS.get(name, [])]):
            yield pytest.param(name, extra, id=f"{name}-{i}")


def test_every_statistic_is_concurrent() -> None:
    # The executor reads the flag off the factory, before making the statistic; compute_stats off the object.
    assert STATISTIC_METHODS
    for name in STATISTIC_METHODS:
        factory = REGISTRY.methods[name].statistic
        assert factory is not None
        assert getattr(factory, "concurrent", False), name
        assert factory().concurrent, name


@pytest.mark.parametrize(("name", "extra"), list(cases()))
@pytest.mark.parametrize("kind", ["bf16", "integers"])
def test_shuffled_and_concurrent_passes_give_the_sequential_bits(
    name: str, extra: dict[str, Any], kind: str, pool: ThreadPoolExecutor
) -> None:
    spec = REGISTRY.methods[name]
    for shape in SHAPES:
        base, models = inputs(spec, shape, kind, seed=len(shape))
        params = params_for(spec, len(models), extra)
        whole = merge_in_chunks(spec, base, models, params, seed=777)
        variants = {"shuffled": {"shuffle_seed": 3}, "pool": {"pool": pool, "window": 4}}
        for label, how in variants.items():
            got = merge_in_chunks(spec, base, models, params, rows_per_chunk=1, seed=777, **how)
            assert torch.equal(bits(got), bits(whole)), f"{name} {shape} {label}"


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "sce", "della", "dare_ties", "nuslerp", "model_stock"])
def test_many_threads_on_a_larger_tensor(name: str, pool: ThreadPoolExecutor) -> None:
    # Enough chunks in flight at once for lost histogram updates or misordered sums to show.
    spec = REGISTRY.methods[name]
    extra = {"rescale": True} if "rescale" in {p.name for p in spec.params} else {}
    if name == "nuslerp":
        extra = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    base, models = inputs(spec, (96, 40), "integers", seed=11)
    params = params_for(spec, len(models), extra)
    whole = merge_in_chunks(spec, base, models, params, seed=5)
    for window, shuffle in ((2, None), (16, 9)):
        got = merge_in_chunks(
            spec, base, models, params, rows_per_chunk=1, seed=5, pool=pool, window=window, shuffle_seed=shuffle
        )
        assert torch.equal(bits(got), bits(whole)), f"{name} window {window}"


# ---------------------------------------------------------------------------------------------
# Fewer passes


def passes_made(name: str, base: Tensor, models: list[Tensor], params: dict[str, Any], rows: int = 4) -> int:
    """How many statistic passes ``compute_stats`` makes (chunks loaded / chunks per pass)."""
    spec = REGISTRY.methods[name]
    chunks = list(row_chunks(tuple(base.shape), rows, seed=0))
    loads = 0

    def load(c: ChunkInfo) -> tuple[Tensor, list[Tensor]]:
        nonlocal loads
        loads += 1
        return base[c.row_start : c.row_end], [m[c.row_start : c.row_end] for m in models]

    compute_stats(spec, tuple(base.shape), params, len(models), chunks, load)
    assert loads % len(chunks) == 0
    return loads // len(chunks)


def ties_params(**given: Any) -> dict[str, Any]:
    params = {"weight": (1.0, 1.0), "density": (0.5, 0.3), "normalize": True, "rescale": False}
    params.update(lambda_=1.0, int8_mask=False)
    params["lambda"] = params.pop("lambda_")
    return {**params, **given}


def test_ties_skips_its_tie_pass_when_no_threshold_splits_tied_magnitudes() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(16, 16, generator=gen)
    distinct = [base + torch.randn(16, 16, generator=gen) for _ in range(2)]  # continuous: no equal magnitudes
    tied = [base + torch.randint(-3, 4, (16, 16), generator=gen).float() for _ in range(2)]  # many equal ones
    assert passes_made("ties", base, distinct, ties_params()) == 2
    assert passes_made("ties", base, tied, ties_params()) == 3
    assert passes_made("ties", base, distinct, ties_params(rescale=True)) == 3
    assert passes_made("ties", base, tied, ties_params(rescale=True)) == 4
    # density 0 and 1: nothing to select
    assert passes_made("ties", base, tied, ties_params(density=(0.0, 1.0))) == 0


def test_sce_skips_selection_passes_it_does_not_need() -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(16, 16, generator=gen)
    distinct = [base + torch.randn(16, 16, generator=gen) for _ in range(2)]
    tied = [base + torch.randint(-1, 2, (16, 16), generator=gen).float() for _ in range(2)]
    common = {"int8_mask": False}
    assert passes_made("sce", base, distinct, {**common, "select_topk": 0.5}) == 3  # high, low, energy
    assert passes_made("sce", base, tied, {**common, "select_topk": 0.5}) == 4  # + ties
    assert passes_made("sce", base, distinct, {**common, "select_topk": 1.0}) == 1
    assert passes_made("sce", base, distinct, {**common, "select_topk": 0.0}) == 0
    assert passes_made("sce", base, distinct, {**common, "select_topk": 0.001}) == 2  # k = 0: high, energy


def test_topk_tie_counts_in_any_order_select_as_in_row_order() -> None:
    rng = random.Random(4)
    x = torch.tensor([rng.choice([-2.0, -1.0, 0.0, 1.0, 2.0]) for _ in range(12 * 5)]).reshape(12, 5)
    keys = magnitude_key(x)
    ks = [7, 23, 41]

    def settled() -> TopK:
        sel = TopK(x.numel(), 12, ks)
        sel.count_high(keys)
        sel.settle_high()
        sel.count_low(keys)
        sel.settle_low()
        return sel

    in_order = settled()
    expected = [in_order.keep(keys[r : r + 1], r, 1, record=True) for r in range(12)]  # legacy: record as it goes
    shuffled = settled()
    assert shuffled.wants("ties")
    for r in rng.sample(range(12), 12):
        shuffled.count_ties(keys[r : r + 1], r, 1)
    shuffled.settle_ties()
    for r in range(12):
        for want, got in zip(expected[r], shuffled.keep(keys[r : r + 1], r, 1), strict=True):
            assert torch.equal(want, got)
    whole = shuffled.keep(keys, 0, 12)
    assert [int(m.sum()) for m in whole] == ks


# ---------------------------------------------------------------------------------------------
# Fast paths against their definitions


def special_values(shape: tuple[int, ...], seed: int, *, finite: bool = True, huge: bool = True) -> Tensor:
    """Signed zeros, subnormals, repeated magnitudes, values whose float32 sums overflow (``huge``),
    and (unless ``finite``) infinities and NaN."""
    gen = torch.Generator().manual_seed(seed)
    values = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -3.0, 1e-45, -1e-45, 1e-40]
    if huge:
        values += [3e38, -3e38, 1e38]
    if not finite:
        values += [float("inf"), -float("inf"), float("nan")]
    table = torch.tensor(values, dtype=torch.float32)
    return table[torch.randint(0, len(values), shape, generator=gen)]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize(("finite", "huge"), [(True, False), (True, True), (False, True)])
def test_agreement_masks_are_sign_agreement(n: int, finite: bool, huge: bool) -> None:
    deltas = [special_values((500,), 10 * n + i, finite=finite, huge=huge) for i in range(n)]
    want = sign_agreement(deltas)
    masks = agreement_masks(deltas)
    assert masks is not None or not (finite and not huge)  # the fast path takes every finite, modest vote
    wide = sum((d.double() for d in deltas[1:]), deltas[0].double())
    vote = deltas[0] + deltas[1] if n == 2 else wide.float()  # float32 for two, float64 narrowed for more
    if masks is None:  # only when the vote is not finite somewhere (NaN, ±inf, or overflowing float32)
        assert not bool(torch.isfinite(vote).all())
        return
    for w, m in zip(want, masks, strict=True):
        assert m.dtype == torch.int32 and set(m.unique().tolist()) <= {0, -1}
        assert torch.equal(m != 0, w)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("finite", [True, False])
def test_consensus_mix_equals_its_boolean_definition(n: int, normalize: bool, finite: bool) -> None:
    for trial, weight in enumerate([[1.0, 0.5, 2.0], [0.7, -0.7, 0.3], [-0.25, 1e-30, 0.0], [1.0, 1.0, 1.0]]):
        deltas = [special_values((300,), 100 * trial + i, finite=finite, huge=trial % 2 == 0) for i in range(n)]
        want = _agreeing_mix([d.clone() for d in deltas], weight[:n], normalize=normalize)
        got = mix([d.clone() for d in deltas], weight[:n], consensus=True, normalize=normalize)
        assert torch.equal(bits(got), bits(want)), (n, weight)


@pytest.mark.parametrize("huge", [False, True])
def test_sce_mix_equals_its_boolean_definition(huge: bool) -> None:
    for trial, weights in enumerate([(0.25, 0.75), (1.0, 0.0), (0.5, 0.5, 0.0)]):
        deltas = [special_values((400,), 7 * trial + i, huge=huge) for i in range(len(weights))]
        base = torch.zeros(400)  # m − 0 == m, −0.0 included
        want = _sce_mix_by_definition([d.clone() for d in deltas], weights).add_(base)
        chunk = ChunkInfo(0, 400, (400,), seed=0)
        got = sce(base, deltas, stats=SceStats(None, weights), chunk=chunk)
        assert torch.equal(bits(got), bits(want)), weights


def reference_pairwise_sum(x: Tensor) -> Tensor:
    """The definition: pad with zeros to a power of two, add halves until one element is left."""
    x = x.to(torch.float64)
    n = x.shape[-1]
    if n == 0:
        return x.new_zeros(x.shape[:-1])
    size = 1 << (n - 1).bit_length()
    x = torch.nn.functional.pad(x, (0, size - n))
    while x.shape[-1] > 1:
        x = x[..., : x.shape[-1] // 2] + x[..., x.shape[-1] // 2 :]
    return x[..., 0]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 13, 64, 100, 129])
def test_pairwise_sum_is_the_padded_tree(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(4, n, generator=gen) * torch.logspace(-20, 20, max(n, 1))[:n]
    if n:
        x[0] = -0.0  # a row of negative zeros: the padding turns them into +0.0
        x[1, :] = special_values((n,), n)
    for data in (x, x.double()):
        assert torch.equal(bits(pairwise_sum(data).float()), bits(reference_pairwise_sum(data).float()))
        assert torch.equal(pairwise_sum(data).view(torch.int64), reference_pairwise_sum(data).view(torch.int64))


@pytest.mark.parametrize("start", [0, 12345, 2**40 + 7])
def test_numpy_random_bits_equal_the_torch_ones(start: int) -> None:
    count = 3 * 2**15 + 17  # several hash blocks and a partial one
    assert torch.equal(random_bits(99, start, count), _random_bits_torch(99, start, count, "cpu"))


@pytest.mark.parametrize("p", [0.0, 1e-300, 0.3, 0.5, 1 - 2**-53, 1.0])
def test_bernoulli_mask_is_uniform_below_p(p: float) -> None:
    shape = (3, 2**15 + 5)
    chunk = ChunkInfo(2, 5, (9, shape[1]), seed=8)
    like = torch.empty(shape)
    mask = bernoulli_mask(1234, like, chunk, p)
    assert mask.dtype == torch.int32 and mask.shape == like.shape
    assert torch.equal(mask != 0, chunk_uniform(1234, like, chunk) < p)


@pytest.mark.parametrize("shape", [(6, 9), (4, 7, 3), (5, 1), (2, 3, 4, 2)])
def test_composite_ranks_equal_the_stable_sort(shape: tuple[int, ...]) -> None:
    magnitude = special_values(shape, sum(shape), finite=False).abs()
    nan_payload = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    magnitude.reshape(-1)[::7] = nan_payload  # NaNs with different payloads still tie
    values = torch.arange(shape[1]) * 10 + 3
    assert torch.equal(by_fiber_rank(magnitude, values), values[_ranks(magnitude, 1)])


def test_variance_key_is_the_float64_population_variance() -> None:
    gen = torch.Generator().manual_seed(2)
    for n in (1, 2, 3):
        deltas = [torch.randn(200, generator=gen).bfloat16().float() for _ in range(n)]
        wide = [d.double() for d in deltas]
        mean = sum(wide[1:], wide[0].clone()) / n
        var = sum(((w - mean) ** 2 for w in wide[1:]), (wide[0] - mean) ** 2) / n
        assert torch.equal(variance_key(deltas), var.float().view(torch.int32))
        assert all(math.isfinite(v) for v in var.tolist())
