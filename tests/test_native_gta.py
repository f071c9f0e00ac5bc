"""The native kernels of TIES, DARE and Breadcrumbs (``mergekitlite/kernels/gta.c``) against their torch path.

The torch path (``methods/sparsify.py`` on float32 tensors) is the reference. For every method with a
kernel, 1–3 models, bf16/fp16/float32 inputs and outputs (and mixed), parameters that change the
operation sequence (densities 0, 1 and in between, negative and zero weights, normalize and rescale on
and off, λ ≠ 1), inputs with many equal magnitudes (top-k thresholds that split ties across rows),
sprinkled NaN/±inf/subnormals/±0 and fully random bit patterns, and several chunkings: the statistic from
raw bytes (``update_raw``) equals the torch statistic, and the kernel's output bytes equal the torch
path's, where a chunk the kernel declines (a non-finite TIES vote) is merged by the torch path, as the
executor does. NaNs compare as NaNs (which operand's payload an addition keeps is not specified in C).

DELLA, DELLA-linear and SCE have no kernel (torch only): their sparsifier/statistic declines.

Then whole merges through ``run_merge``: the native path and ``--no-native`` write identical files, the
kernels really ran, and ``--no-native`` ran none of them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from builders import load_tensors

from mergekitlite import working_space
from mergekitlite.api import MergeOptions, run_merge
from mergekitlite.methods import ChunkInfo, get_method, native_gta
from mergekitlite.methods.apply import RawChunk, compute_stats, row_chunks
from mergekitlite.methods.sparsify import SparseStatistic

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
METHODS = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties")
ROWS, COLS = 12, 40

needs_kernel = pytest.mark.skipif(not native_gta.available(), reason="the native GTA kernel is not built here")


def test_kernel_is_built_where_required() -> None:
    """`make test` sets MERGEKITLITE_REQUIRE_NATIVE=1: a broken build must fail CI, not silently fall back."""
    if os.environ.get("MERGEKITLITE_REQUIRE_NATIVE") != "1":
        pytest.skip("MERGEKITLITE_REQUIRE_NATIVE is not set")
    assert native_gta.available(), "mergekitlite._gta did not build or is stale (pip install -e . rebuilds it)"


# ---------------------------------------------------------------- inputs


def _inputs(kind: str, codes: Sequence[str], gen: torch.Generator) -> list[torch.Tensor]:
    """Base first. ``ties``: fine-tunes as real ones (bf16-valued: many equal |δ|); ``equal``: every |δ| the
    same (thresholds split ties in every row); ``special``: ``ties`` plus NaN/±inf/subnormals/±0 in a few
    rows; ``bits``: random bit patterns (16-bit) or values of every magnitude with specials (float32)."""
    n = ROWS * COLS
    if kind == "bits":
        out = []
        for code in codes:
            if code == "F32":
                x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 30, (n,), generator=gen).float())
                x[torch.randint(0, n, (16,), generator=gen)] = float("nan")
                x[torch.randint(0, n, (16,), generator=gen)] = float("inf")
            else:
                x = torch.randint(-(2**15), 2**15, (n,), generator=gen, dtype=torch.int16).view(DTYPES[code])
            out.append(x.reshape(ROWS, COLS))
        return out
    base = (torch.randn(ROWS, COLS, generator=gen) * 0.02).bfloat16().float()
    xs = [base]
    for i in range(len(codes) - 1):
        if kind == "equal":
            sign = torch.randint(0, 2, (ROWS, COLS), generator=gen).float() * 2 - 1
            xs.append(base + sign * 0.0078125 * (i + 1))
        else:
            xs.append((base + torch.randn(ROWS, COLS, generator=gen) * 0.004).bfloat16().float())
    if kind == "special":
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-42, 3e38])
        for x in xs:
            rows = torch.randint(0, ROWS, (2,), generator=gen)
            cols = torch.randint(0, COLS, (2,), generator=gen)
            x[rows, cols] = specials[torch.randint(0, len(specials), (2,), generator=gen)]
    return [x.to(DTYPES[c]) for x, c in zip(xs, codes)]


VARIANTS: list[dict[str, Any]] = [
    # per-model values are cut to the number of models
    {"density": (0.5, 0.3, 0.7), "weight": (1.0, -0.5, 0.0), "normalize": True, "rescale": True},
    {"density": (0.0, 1.0, 0.4), "weight": (0.7, 1.0, 2.0), "normalize": False, "rescale": False, "lambda": 0.8},
    {"density": (1.0, 1.0, 1.0), "weight": (0.3, 0.3, 0.3), "normalize": True, "rescale": True},
    {"density": (0.9, 0.05, 0.5), "gamma": (0.05, 0.0, 0.2), "weight": (-1.0, 0.5, 1.0), "rescale": False,
     "normalize": True, "lambda": 1.5},
    {"density": (0.25, 0.5, 0.75), "weight": (0.0, 0.0, 0.0), "normalize": True, "rescale": True},
]  # fmt: skip


def _params(method: str, n: int, variant: dict[str, Any]) -> dict[str, Any]:
    spec = get_method(method)
    params = working_space.params(spec, n, {"weight": 1.0, "density": 0.5, "gamma": 0.01})
    for name, value in variant.items():
        if name in params:
            params[name] = tuple(value[:n]) if isinstance(value, tuple) else value
    return params


# ---------------------------------------------------------------- the two paths


def _f32(xs: Sequence[torch.Tensor], c: ChunkInfo) -> tuple[torch.Tensor, list[torch.Tensor]]:
    f = [x[c.row_start : c.row_end].to(torch.float32) for x in xs]
    return f[0], f[1:]


def _raw(xs: Sequence[torch.Tensor], c: ChunkInfo) -> list[torch.Tensor]:
    return [x[c.row_start : c.row_end].contiguous().reshape(-1).view(torch.uint8) for x in xs]


def _native_path(
    method: str, xs: list[torch.Tensor], codes: list[str], out_code: str, params: dict[str, Any], rows: int
) -> tuple[torch.Tensor, Any, int, int]:
    """(output, statistic, chunks merged by the kernel, raw statistic updates) as the executor runs it."""
    spec = get_method(method)
    shape = tuple(xs[0].shape)
    chunks = list(row_chunks(shape, rows, seed=11))
    raw_updates = [0]

    def load_raw(c: ChunkInfo) -> RawChunk:
        raw_updates[0] += 1
        return RawChunk(_raw(xs, c), codes, lambda: _f32(xs, c))

    stats = compute_stats(spec, shape, params, len(xs) - 1, chunks, lambda c: _f32(xs, c), load_raw=load_raw)
    kernel = spec.native_merge(True, len(xs) - 1, params, codes, out_code)
    assert kernel is not None
    parts, native_chunks = [], 0
    for c in chunks:
        out = torch.empty((c.row_end - c.row_start) * COLS * DTYPES[out_code].itemsize, dtype=torch.uint8)
        if kernel(_raw(xs, c), out, c, stats) is not None:
            native_chunks += 1
            parts.append(out.view(DTYPES[out_code]).reshape(-1, COLS))
        else:
            base, models = _f32(xs, c)
            parts.append(spec(base, models, params, chunk=c, stats=stats).to(DTYPES[out_code]))
    return torch.cat(parts), stats, native_chunks, raw_updates[0]


def _torch_path(
    method: str, xs: list[torch.Tensor], out_code: str, params: dict[str, Any], rows: int
) -> tuple[torch.Tensor, Any]:
    """The reference, with the same chunking: the torch path is chunk-independent except for NaN payloads
    (torch widens fp16 NaNs differently in its vectorised and scalar loops), which order NaN keys."""
    spec = get_method(method)
    shape = (ROWS, COLS)
    chunks = list(row_chunks(shape, rows, seed=11))
    stats = compute_stats(spec, shape, params, len(xs) - 1, chunks, lambda c: _f32(xs, c))
    parts = []
    for c in chunks:
        base, models = _f32(xs, c)
        parts.append(spec(base, models, params, chunk=c, stats=stats).to(DTYPES[out_code]))
    return torch.cat(parts), stats


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a_nan, e_nan = actual.isnan(), expected.isnan()
    assert torch.equal(a_nan, e_nan), f"{what}: NaN at different places"
    view = torch.int16 if actual.element_size() == 2 else torch.int32
    differ = int((actual[~a_nan].view(view) != expected[~e_nan].view(view)).sum())
    assert differ == 0, f"{what}: {differ}/{actual.numel()} elements differ"


def _assert_same_statistic(native: Any, reference: Any, what: str) -> None:
    def key(scale: float | None) -> Any:
        return "nan" if scale is not None and math.isnan(scale) else scale

    assert [key(s) for s in native.scales] == [key(s) for s in reference.scales], f"{what}: rescale factors differ"
    for a, b in zip(native.sparsifiers, reference.sparsifiers, strict=True):
        assert (a is None) == (b is None)
        if a is None or not hasattr(a, "selector"):
            continue
        qa = [(q.k, q.threshold, q.ties_allowed, q.ties_total) for q in a.selector.queries]
        qb = [(q.k, q.threshold, q.ties_allowed, q.ties_total) for q in b.selector.queries]
        assert qa == qb, f"{what}: top-k thresholds differ"
        assert torch.equal(a.selector.row_ties, b.selector.row_ties), f"{what}: per-row tie counts differ"


CODE_CASES = [("BF16", "BF16"), ("F16", "F16"), ("F32", "F32"), ("mixed", "F16"), ("BF16", "F32"), ("F32", "BF16")]


@needs_kernel
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(("in_code", "out_code"), CODE_CASES)
def test_native_equals_torch(method: str, n: int, in_code: str, out_code: str) -> None:
    gen = torch.Generator().manual_seed(hash((method, n, in_code, out_code)) % 2**31)
    codes = (["BF16", "F32", "F16", "BF16"] if in_code == "mixed" else [in_code] * 4)[: n + 1]
    kernel_chunks = raw_folds = 0
    for v, variant in enumerate(VARIANTS):
        params = _params(method, n, variant)
        for kind in ("ties", "equal", "special", "bits") if v in (0, 3) else ("ties", "special", "bits"):
            xs = _inputs(kind, codes, gen)
            for rows in (ROWS, 1) if v == 0 else (5,):
                what = f"{method} n={n} {codes}->{out_code} variant {v} {kind} {rows}-row chunks"
                expected, ref_stats = _torch_path(method, xs, out_code, params, rows)
                got, stats, merged, raw_updates = _native_path(method, xs, codes, out_code, params, rows)
                raw_folds += raw_updates
                _assert_same_statistic(stats, ref_stats, what)
                _assert_same_bits(got, expected, what)
                kernel_chunks += merged
                if kind in ("ties", "equal"):  # finite votes: no chunk goes back to torch
                    assert merged == math.ceil(ROWS / rows), what
    assert kernel_chunks > 0 and raw_folds > 0


@needs_kernel
def test_top_k_ties_split_inside_rows() -> None:
    """Every |δ| equal: the threshold keeps part of the ties, the first ones in flat order, with the split
    inside a row (not at a row boundary) and for two windows (Breadcrumbs: top and bottom)."""
    codes = ["BF16", "BF16", "BF16"]
    xs = _inputs("equal", codes, torch.Generator().manual_seed(3))
    for method in ("ties", "breadcrumbs_ties"):
        params = _params(method, 2, {"density": (0.37, 0.61), "gamma": (0.13, 0.29), "weight": (1.0, 1.0)})
        expected, ref_stats = _torch_path(method, xs, "BF16", params, ROWS)
        rules = ref_stats.sparsifiers[0].selector.mask_rules(0, ROWS)
        assert any(r[2] is not None and bool((r[2][1] > 0).any()) for r in rules), "no row keeps part of its ties"
        for rows in (1, 3, ROWS):
            got, stats, merged, _ = _native_path(method, xs, codes, "BF16", params, rows)
            _assert_same_statistic(stats, ref_stats, f"{method} {rows}")
            _assert_same_bits(got, expected, f"{method} {rows}-row chunks")
            assert merged == math.ceil(ROWS / rows)


@needs_kernel
def test_non_finite_vote_falls_back_per_chunk() -> None:
    """A NaN in one chunk: that chunk is declined (the torch path switches formula there), the others not."""
    codes = ["F32", "F32", "F32"]
    xs = _inputs("ties", codes, torch.Generator().manual_seed(5))
    xs[1][7, 3] = float("nan")
    params = _params("ties", 2, {"density": (0.5, 0.5), "weight": (1.0, 1.0)})
    expected, _ = _torch_path("ties", xs, "F32", params, 4)
    got, _, merged, _ = _native_path("ties", xs, codes, "F32", params, 4)
    _assert_same_bits(got, expected, "ties with a NaN")
    assert merged == 2  # of 3 chunks: rows 4..8 hold the NaN


@needs_kernel
def test_non_finite_counts() -> None:
    """The kernel counts the NaN/±inf it reads (per input), writes, and writes from a finite float32 value
    (an overflow on the cast), as ``nonfinite.NonFinite.from_kernel`` takes them."""
    codes = ["BF16", "BF16", "BF16"]
    xs = _inputs("special", codes, torch.Generator().manual_seed(8))
    xs[0][0, 0] = float("inf")
    # bf16's largest value + 2^119: finite in float32, the midpoint to inf, which ties to even (inf): an overflow
    xs[0][1, :2], xs[1][1, :2], xs[2][1, :2] = 0.0, 3.3895314e38, 2.0**119
    c = ChunkInfo(0, ROWS, (ROWS, COLS), 11)
    out = torch.empty(ROWS * COLS * 2, dtype=torch.uint8)
    specs = [native_gta.KEEP_ALL.spec(None, None)] * 2
    found = native_gta.run_merge(
        _raw(xs, c), codes, out, "BF16", c, specs, [1.0, 1.0],
        consensus=False, normalize_agreeing=False, divisor=None, lambda_=None,
    )  # fmt: skip
    assert found is not None
    per_input, written, overflow = found
    assert list(per_input) == [int((~x.float().isfinite()).sum()) for x in xs]
    f = [x.float() for x in xs]
    exact = ((f[1] - f[0]) + (f[2] - f[0])) + f[0]  # the float32 result before the cast
    merged = out.view(torch.bfloat16).reshape(ROWS, COLS).float()
    assert written == int((~merged.isfinite()).sum())
    assert overflow == int((exact.isfinite() & ~merged.isfinite()).sum()) > 0


def test_torch_only_members_decline() -> None:
    """DELLA and SCE have no kernel: no native merge, and their statistics run on torch."""
    params = _params("della", 2, {"density": (0.5, 0.5), "epsilon": (0.1, 0.1)})
    assert get_method("della").native_merge(True, 2, params, ["BF16"] * 3, "BF16") is None
    assert get_method("sce").native_merge(True, 2, {"select_topk": 0.5}, ["BF16"] * 3, "BF16") is None
    stat = SparseStatistic("della")
    state = stat.begin((ROWS, COLS), 2, params)
    raw = _raw(_inputs("ties", ["BF16"] * 3, torch.Generator().manual_seed(1)), ChunkInfo(0, ROWS, (ROWS, COLS), 1))
    assert not stat.update_raw(state, 0, raw, ["BF16"] * 3, params, ChunkInfo(0, ROWS, (ROWS, COLS), 1))


# ---------------------------------------------------------------- whole merges


RECIPE = """
    merge_method: {method}
    base_model: {base}
    models:
      - model: {a}
        parameters: {{weight: 0.7, density: 0.4{extra}}}
      - model: {b}
        parameters: {{weight: -0.3, density: 0.6{extra}}}
    parameters: {{normalize: true, rescale: true, lambda: 0.9}}
    dtype: {dtype}
    random_seed: 7
"""


@needs_kernel
@pytest.mark.parametrize(
    ("method", "dtype"),
    [("ties", "bfloat16"), ("dare_ties", "float16"), ("dare_linear", "bfloat16"), ("breadcrumbs_ties", "float32")],
)
def test_native_merge_equals_torch_merge(llama_family, tmp_path, write_recipe, monkeypatch, method, dtype) -> None:
    fam = {k: str(v) for k, v in llama_family.items()}
    extra = ", gamma: 0.05" if method.startswith("breadcrumbs") else ""
    recipe = write_recipe(RECIPE.format(method=method, dtype=dtype, extra=extra, **fam))
    calls = {"merge": 0, "stats": 0}
    real_merge, real_l1, real_high = native_gta.run_merge, native_gta.row_l1, native_gta.count_high

    def counting(key: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            calls[key] += 1
            return fn(*a, **k)

        return wrapper

    monkeypatch.setattr(native_gta, "run_merge", counting("merge", real_merge))
    monkeypatch.setattr(native_gta, "row_l1", counting("stats", real_l1))
    monkeypatch.setattr(native_gta, "count_high", counting("stats", real_high))
    fast = run_merge(recipe, tmp_path / "native", MergeOptions(hash_inputs=False, max_ram=400 * 1000**2 + (2 << 20)))
    assert calls["merge"] and calls["stats"], f"the native kernels did not run: {calls}"
    before = dict(calls)
    slow = run_merge(
        recipe, tmp_path / "torch", MergeOptions(hash_inputs=False, native=False, max_ram=400 * 1000**2 + (2 << 20))
    )
    assert calls == before, "--no-native still called a native kernel"
    a, b = load_tensors(fast.output), load_tensors(slow.output)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
    assert {n: f.to_json() for n, f in fast.nonfinite.items()} == {n: f.to_json() for n, f in slow.nonfinite.items()}


@needs_kernel
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties"])
@pytest.mark.parametrize(("shape", "rows"), [((7,), 3), ((), 1), ((5, 1), 2), ((3, 2100), 2)])
def test_shapes(method: str, shape: tuple[int, ...], rows: int) -> None:
    """1-D tensors (rows of one element), a scalar, and rows longer than the kernel's 1024-element block."""
    spec = get_method(method)
    gen = torch.Generator().manual_seed(len(shape) * 10 + rows)
    xs = [(torch.randn(shape, generator=gen) * 0.02).bfloat16() for _ in range(3)]
    params = _params(method, 2, {"density": (0.5, 0.3), "gamma": (0.1, 0.1), "weight": (0.5, 1.0)})
    chunks = list(row_chunks(shape, rows, seed=3))

    def part(x: torch.Tensor, c: ChunkInfo) -> torch.Tensor:
        return x if not shape else x[c.row_start : c.row_end]

    def f32(c: ChunkInfo) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return part(xs[0], c).float(), [part(x, c).float() for x in xs[1:]]

    def raw(c: ChunkInfo) -> list[torch.Tensor]:
        return [part(x, c).contiguous().reshape(-1).view(torch.uint8) for x in xs]

    reference = compute_stats(spec, shape, params, 2, chunks, f32)
    stats = compute_stats(
        spec, shape, params, 2, chunks, f32, load_raw=lambda c: RawChunk(raw(c), ["BF16"] * 3, lambda: f32(c))
    )
    kernel = spec.native_merge(True, 2, params, ["BF16"] * 3, "BF16")
    assert kernel is not None
    for c in chunks:
        out = torch.empty(raw(c)[0].numel(), dtype=torch.uint8)
        assert kernel(raw(c), out, c, stats)
        base, models = f32(c)
        expected = spec(base, models, params, chunk=c, stats=reference).bfloat16().reshape(-1)
        _assert_same_bits(out.view(torch.bfloat16), expected, f"{method} {shape} rows {c.row_start}..")


@needs_kernel
@pytest.mark.parametrize(("distinct", "passes"), [(1, 2), (3, 2), (10, 3)])
def test_tie_counts_recorded_in_the_low_pass(distinct: int, passes: int) -> None:
    """Few distinct keys per row in the threshold's 16-bit bin (as bf16 fine-tunes have): the low pass records
    them and the tie pass is not made; more than the kernel's slots: it is. The statistic and the merge are
    the torch ones either way."""
    gen = torch.Generator().manual_seed(distinct)
    lows = torch.randint(0, distinct, (ROWS, COLS), generator=gen)
    magnitude = (torch.full((ROWS, COLS), 0x3F800000, dtype=torch.int32) + lows.int()).view(torch.float32)
    sign = torch.randint(0, 2, (ROWS, COLS), generator=gen).float() * 2 - 1
    xs = [torch.zeros(ROWS, COLS), magnitude * sign]
    codes = ["F32", "F32"]
    params = _params("ties", 1, {"density": (0.45,), "weight": (1.0,)})
    expected, reference = _torch_path("ties", xs, "F32", params, 3)
    got, stats, _, folds = _native_path("ties", xs, codes, "F32", params, 3)
    assert reference.sparsifiers[0].selector.needs_ties
    assert folds == passes * math.ceil(ROWS / 3)
    _assert_same_statistic(stats, reference, f"{distinct} distinct")
    _assert_same_bits(got, expected, f"{distinct} distinct")
