"""The shared building blocks: exact reductions, counter-based random numbers, exact top-k, sign election."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mergekitlite.methods import ChunkInfo
from mergekitlite.methods.primitives import (
    TopK,
    chunk_bernoulli,
    chunk_uniform,
    magnitude_key,
    pairwise_sum,
    row_sums,
    sign_agreement,
    stream_key,
    uniform,
)

MASK = (1 << 64) - 1


def reference_splitmix64(state: int) -> int:
    """splitmix64 as published (Steele, Lea, Flood 2014; Vigna's C reference), in Python integers."""
    z = (state + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_splitmix_reference_sequence() -> None:
    # Published reference outputs for seed 1234567 (Rosetta Code, "Pseudo-random numbers/Splitmix64").
    state, outputs = 1234567, []
    for _ in range(3):
        outputs.append(reference_splitmix64(state))
        state = (state + 0x9E3779B97F4A7C15) & MASK
    assert outputs == [6457827717110365317, 3203168211198807973, 9817491932198370423]


@pytest.mark.parametrize("key", [0, 1, 0xFFFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0001, stream_key(42, 3)])
@pytest.mark.parametrize("start", [0, 7, 2**40 + 3])
def test_uniform_matches_a_python_splitmix(key: int, start: int) -> None:
    got = uniform(key, start, 9)
    states = [(key + i * 0x9E3779B97F4A7C15) & MASK for i in range(start, start + 9)]
    want = [(reference_splitmix64(z) >> 11) * 2.0**-53 for z in states]
    assert got.dtype == torch.float64
    assert got.tolist() == want


@pytest.mark.parametrize("p", [0.0, 1e-300, 0.3, 0.5, 1 - 2**-53, 1.0, 1.5, -0.5])
def test_integer_bernoulli_equals_uniform_below_p(p: float) -> None:
    chunk = ChunkInfo(3, 9, (10, 7), seed=5)
    like = torch.empty(6, 7)
    u = chunk_uniform(11, like, chunk)
    assert torch.equal(chunk_bernoulli(11, like, chunk, p), u < p)


def test_uniform_is_a_function_of_the_flat_index() -> None:
    whole = uniform(99, 0, 1000)
    pieces = torch.cat([uniform(99, s, min(37, 1000 - s)) for s in range(0, 1000, 37)])
    assert torch.equal(whole, pieces)
    assert not torch.equal(whole, uniform(100, 0, 1000))
    assert float(whole.min()) >= 0.0 and float(whole.max()) < 1.0
    assert abs(float(whole.mean()) - 0.5) < 0.03


def test_pairwise_sum_is_close_to_exact_and_independent_of_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 37, generator=gen) * torch.logspace(-3, 3, 37)
    sums = row_sums(x, 6)
    for r in range(6):
        exact = math.fsum(float(v) for v in x[r])
        assert sums[r].item() == pytest.approx(exact, rel=1e-12, abs=1e-12)
        # the same row reduced alone or among others gives the same bits
        assert row_sums(x[r : r + 1], 1)[0].item() == sums[r].item()
    assert pairwise_sum(torch.zeros(3, 0)).tolist() == [0.0, 0.0, 0.0]
    assert pairwise_sum(torch.tensor([1.5])).item() == 1.5


def brute_force_top(values: list[float], k: int) -> set[int]:
    """Indices of the k largest |v|; equal magnitudes: lower index first (the documented tie rule)."""
    order = sorted(range(len(values)), key=lambda i: (-abs(values[i]), i))
    return set(order[:k])


def run_topk(x: torch.Tensor, ks: list[int], rows_per_chunk: int) -> list[set[int]]:
    rows = x.shape[0]
    sel = TopK(x.numel(), rows, ks)
    keys = magnitude_key(x)
    starts = range(0, rows, rows_per_chunk)
    for s in starts:
        sel.count_high(keys[s : s + rows_per_chunk])
    sel.settle_high()
    for s in starts:
        sel.count_low(keys[s : s + rows_per_chunk])
    sel.settle_low()
    masks: list[list[torch.Tensor]] = [[] for _ in ks]
    for s in starts:
        n = min(rows_per_chunk, rows - s)
        for q, m in enumerate(sel.keep(keys[s : s + n], s, n, record=True)):
            masks[q].append(m)
    # the merge pass (record=False) must agree with the recording pass
    for s in starts:
        n = min(rows_per_chunk, rows - s)
        for q, m in enumerate(sel.keep(keys[s : s + n], s, n)):
            assert torch.equal(m, masks[q][s // rows_per_chunk])
    return [set(torch.nonzero(torch.cat(m).reshape(-1)).reshape(-1).tolist()) for m in masks]


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 3, 9])
def test_topk_is_exact_with_heavy_ties(rows_per_chunk: int) -> None:
    rng = random.Random(rows_per_chunk)
    values = [rng.choice([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 0.5, -0.5]) for _ in range(9 * 4)]
    x = torch.tensor(values).reshape(9, 4)
    ks = [0, 1, 5, 13, 20, 35, 36]
    got = run_topk(x, ks, rows_per_chunk)
    for k, chosen in zip(ks, got, strict=True):
        assert chosen == brute_force_top(values, k), k


def test_topk_distinguishes_values_differing_in_the_low_bits() -> None:
    ulp = 2.0**-23  # float32 spacing just above 1.0: these differ only in the lowest mantissa bits
    values = [1.0, 1.0 + ulp, 1.0 + 2 * ulp, 0.25, -1.0]
    x = torch.tensor(values, dtype=torch.float32).reshape(5, 1)
    got = run_topk(x, [1, 2, 3], 2)
    assert got == [{2}, {1, 2}, {0, 1, 2}]  # 1.0 ties with −1.0: the lower index (0) is taken first


def test_sign_agreement_by_mass() -> None:
    a = torch.tensor([3.0, -1.0, 0.0, 2.0])
    b = torch.tensor([-1.0, -1.0, 5.0, -2.0])
    # sums: 2 (+), −2 (−), 5 (+), 0 (+ on zero)
    agree_a, agree_b = sign_agreement([a, b])
    assert agree_a.tolist() == [True, True, False, True]
    assert agree_b.tolist() == [False, True, True, False]


def test_sign_vote_does_not_lose_small_votes_to_float32_rounding() -> None:
    # Exact sum of (2²⁵, −1, −1, −2²⁵) is −2: − is elected. Summed left to right in float32,
    # 2²⁵ − 1 rounds back to 2²⁵ twice and the total is 0, which would elect +.
    parts = [torch.tensor([2.0**25]), torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-(2.0**25)])]
    float32_total = ((parts[0] + parts[1]) + parts[2]) + parts[3]
    assert float(float32_total[0]) == 0.0
    agree = sign_agreement(parts)
    assert [bool(m[0]) for m in agree] == [False, True, True, True]
