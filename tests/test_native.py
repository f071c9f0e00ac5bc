"""The fused native kernel (``mergekitlite/_native.c``) against float32 references written out here.

Every linear method, every parameter shape that changes the operation sequence (weights of 1,
normalize, λ), every input/output dtype the kernel takes (bf16, fp16, float32, mixed) and lengths
around its 1024-element block: the kernel's bytes equal the reference's, which is built from plain
float32 torch ops with one cast at the end. Inputs are random *bit patterns* for the 16-bit dtypes,
so zeros, subnormals, infinities, NaNs and rounding ties all occur. NaNs are compared as NaN: which
operand's payload survives an addition is not specified in C (a compiler may swap the operands).

Then whole merges: the native path and ``--no-native`` write identical files, and the kernel is
really what ran.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
import torch
from builders import assert_native_merge_equals_torch, load_tensors

from mergekitlite.api import MergeOptions, run_merge
from mergekitlite.methods import get_method, native
from mergekitlite.methods.linear_form import LinearForm, evaluate
from mergekitlite.methods.spherical import slerp_coefficients

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}

needs_kernel = pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")


def test_kernel_is_built_where_required() -> None:
    """`make test` sets MERGEKITLITE_REQUIRE_NATIVE=1: a broken build must fail CI, not silently fall back."""
    if os.environ.get("MERGEKITLITE_REQUIRE_NATIVE") != "1":
        pytest.skip("MERGEKITLITE_REQUIRE_NATIVE is not set")
    assert native.available(), "mergekitlite._native did not build or is stale (pip install -e . rebuilds it)"


def _random_values(code: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """16-bit dtypes: every bit pattern is possible (NaN, ±inf, subnormals, ±0). float32: mostly
    ordinary weights of mixed magnitudes, plus the special values."""
    if code != "F32":
        bits = torch.randint(-(2**15), 2**15, (n,), generator=gen, dtype=torch.int16)
        return bits.view(DTYPES[code])
    x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 30, (n,), generator=gen).float())
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -3e-39, 3.4e38, 65520.0])
    pos = torch.randint(0, n, (min(n, 64),), generator=gen)
    x[pos] = special[torch.randint(0, len(special), (len(pos),), generator=gen)]
    return x


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a_nan, e_nan = actual.isnan(), expected.isnan()
    assert torch.equal(a_nan, e_nan), f"{what}: NaN at different places"
    a_bits = actual[~a_nan].view(torch.int16 if actual.element_size() == 2 else torch.int32)
    e_bits = expected[~e_nan].view(torch.int16 if actual.element_size() == 2 else torch.int32)
    differ = int((a_bits != e_bits).sum())
    assert differ == 0, f"{what}: {differ}/{actual.numel()} elements differ"


def _run_kernel(form: object, xs: Sequence[torch.Tensor], codes: Sequence[str], out_code: str) -> torch.Tensor:
    n = xs[0].numel()
    out = torch.empty(n * DTYPES[out_code].itemsize, dtype=torch.uint8)
    native.run_linear(form, [x.contiguous().view(torch.uint8) for x in xs], codes, out, out_code)  # type: ignore[arg-type]
    return out.view(DTYPES[out_code])


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def _s(v: float) -> torch.Tensor:
    """A Python float rounded to float32, as torch rounds a scalar operand (and the kernel does)."""
    return torch.tensor(v, dtype=torch.float32)


# Each case: method, has_base, number of models, params, float32 reference over (base, models).
Ref = Callable[[torch.Tensor | None, list[torch.Tensor]], torch.Tensor]


def _ta(ws: Sequence[float], normalize: bool, lam: float) -> Ref:
    def ref(b: torch.Tensor | None, ms: list[torch.Tensor]) -> torch.Tensor:
        assert b is not None
        total = (ms[0] - b) * _s(ws[0])
        for m, w in zip(ms[1:], ws[1:]):
            total = total + (m - b) * _s(w)
        if normalize and abs(sum(ws)) >= 1e-8:
            total = total / _s(sum(ws))
        return total * _s(lam) + b

    return ref


def _linear(ws: Sequence[float], normalize: bool) -> Ref:
    def ref(b: torch.Tensor | None, ms: list[torch.Tensor]) -> torch.Tensor:
        total = ms[0] * _s(ws[0])
        for m, w in zip(ms[1:], ws[1:]):
            total = total + m * _s(w)
        return total / _s(sum(ws)) if normalize else total

    return ref


def _add_difference(ws: Sequence[float], lam: float) -> Ref:
    def ref(b: torch.Tensor | None, ms: list[torch.Tensor]) -> torch.Tensor:
        assert b is not None
        total = (ms[1] - b) * _s(ws[1])
        for m, w in zip(ms[2:], ws[2:]):
            total = total + (m - b) * _s(w)
        return total * _s(lam) + ms[0]

    return ref


def _task_vector(ws: Sequence[float], lam: float) -> Ref:
    def ref(b: torch.Tensor | None, ms: list[torch.Tensor]) -> torch.Tensor:
        assert b is not None
        total = (ms[0] - b) * _s(ws[0])
        for m, w in zip(ms[1:], ws[1:]):
            total = total + (m - b) * _s(w)
        return total * _s(lam)

    return ref


def _add_delta(ws: Sequence[float], lam: float) -> Ref:
    def ref(b: torch.Tensor | None, ms: list[torch.Tensor]) -> torch.Tensor:
        assert b is not None
        total = ms[0] * _s(ws[0])
        for d, w in zip(ms[1:], ws[1:]):
            total = total + d * _s(w)
        return total * _s(lam) + b

    return ref


def _passthrough(scale: float | None) -> Ref:
    return lambda b, ms: ms[0] if scale is None else ms[0] * _s(scale)


CASES = [
    ("task_arithmetic", True, 2, {"weight": (1.0, 1.0)}, _ta((1.0, 1.0), False, 1.0)),
    ("task_arithmetic", True, 3, {"weight": (0.7, 1.0, -0.3), "lambda": 0.8}, _ta((0.7, 1.0, -0.3), False, 0.8)),
    ("task_arithmetic", True, 2, {"weight": (0.6, 0.3), "normalize": True}, _ta((0.6, 0.3), True, 1.0)),
    ("task_arithmetic", True, 2, {"weight": (0.5, -0.5), "normalize": True}, _ta((0.5, -0.5), True, 1.0)),
    ("task_arithmetic", True, 1, {"weight": (1.0,)}, _ta((1.0,), False, 1.0)),
    ("linear", False, 3, {"weight": (0.2, 0.3, 0.5)}, _linear((0.2, 0.3, 0.5), True)),
    ("linear", False, 2, {"weight": (1.0, 2.0), "normalize": False}, _linear((1.0, 2.0), False)),
    ("add_difference", True, 3, {"weight": (1.0, 0.8, 1.0), "lambda": 1.5}, _add_difference((1.0, 0.8, 1.0), 1.5)),
    ("task_vector", True, 2, {"weight": (1.0, 0.25)}, _task_vector((1.0, 0.25), 1.0)),
    ("task_vector", True, 1, {"weight": (1.0,), "lambda": -2.0}, _task_vector((1.0,), -2.0)),
    ("add_delta", True, 2, {"weight": (0.8, 1.0), "lambda": 0.5}, _add_delta((0.8, 1.0), 0.5)),
    ("passthrough", False, 1, {"scale": (None,)}, _passthrough(None)),
    ("passthrough", False, 1, {"scale": (0.1,)}, _passthrough(0.1)),
]


def _defaults(method: str, params: dict) -> dict:
    spec = get_method(method)
    return {p.name: params.get(p.name, p.default) for p in spec.params}


@needs_kernel
@pytest.mark.parametrize(("method", "has_base", "n_models", "params", "ref"), CASES)
@pytest.mark.parametrize(
    ("in_codes", "out_code"),
    [("BF16", "BF16"), ("F16", "F16"), ("F32", "F32"), ("BF16", "F32"), ("F32", "BF16"), ("mixed", "F16")],
)
def test_kernel_equals_float32_reference(method, has_base, n_models, params, ref, in_codes, out_code) -> None:
    gen = torch.Generator().manual_seed(hash((method, n_models, in_codes, out_code)) % 2**31)
    n_inputs = n_models + has_base
    codes = ["BF16", "F32", "F16"] * 3 if in_codes == "mixed" else [in_codes] * 9
    codes = codes[:n_inputs]
    params = _defaults(method, params)
    form = get_method(method).form(has_base, n_models, params)
    for n in (1, 7, 1023, 1024, 1025, 4099):
        xs = [_random_values(c, n, gen) for c in codes]
        f32 = [_f32(x) for x in xs]
        base, models = (f32[0], f32[1:]) if has_base else (None, f32)
        expected = ref(base, models).to(DTYPES[out_code])
        _assert_same_bits(_run_kernel(form, xs, codes, out_code), expected, f"{method} {codes}->{out_code} n={n}")
        # ... and the method's own torch path gives the same.
        torch_path = get_method(method)(base, list(models), params).to(DTYPES[out_code])
        _assert_same_bits(torch_path, expected, f"torch path {method} {codes}->{out_code} n={n}")


@needs_kernel
@pytest.mark.parametrize(("in_codes", "out_code"), [("BF16", "BF16"), ("F16", "F16"), ("F32", "F32"), ("F32", "BF16")])
def test_weighted_anchor_equals_the_torch_evaluation(in_codes: str, out_code: str) -> None:
    """model_stock's form: t·(m₀ + m₁)/2 + (1 − t)·base, the anchor multiplied before it is added."""
    gen = torch.Generator().manual_seed(7)
    t = 0.3718
    form = LinearForm((1, 2), (None, None), divisor=2, scale=t, anchor=0, anchor_weight=1 - t)
    for n in (1, 1023, 1025, 4099):
        xs = [_random_values(in_codes, n, gen) for _ in range(3)]
        expected = evaluate(form, [_f32(x) for x in xs]).to(DTYPES[out_code])
        _assert_same_bits(_run_kernel(form, xs, [in_codes] * 3, out_code), expected, f"{in_codes}->{out_code} n={n}")


@needs_kernel
def test_rounding_to_16_bits_at_the_edges() -> None:
    """float32 → bf16/fp16 conversions exactly as torch does them, over every float32 exponent and
    the mantissa patterns that decide rounding (ties, one above/below a tie, overflow to inf, fp16
    subnormals and underflow), through a passthrough form (the value itself)."""
    exps = torch.arange(0, 256, dtype=torch.int32) << 23
    mants = torch.tensor(
        [0, 1, 0x7FFF, 0x8000, 0x8001, 0x18000, 0xFFFF, 0xFFF, 0x1000, 0x1001, 0x3000, 0x7FFFFF, 0x7FF000, 0x400000],
        dtype=torch.int32,
    )
    bits = (exps[:, None] | mants[None, :]).reshape(-1)
    bits = torch.cat([bits, bits | (-(2**31))])
    x = bits.view(torch.float32)
    form = get_method("passthrough").form(False, 1, {"scale": (None,)})
    for out_code in ("BF16", "F16"):
        _assert_same_bits(_run_kernel(form, [x], ["F32"], out_code), x.to(DTYPES[out_code]), out_code)


@needs_kernel
def test_fp16_inputs_widen_exactly() -> None:
    """Every fp16 bit pattern widens to the float32 torch gives (NaNs as NaNs)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    form = get_method("passthrough").form(False, 1, {"scale": (None,)})
    _assert_same_bits(_run_kernel(form, [x], ["F16"], "F32"), x.to(torch.float32), "fp16 -> f32")


@needs_kernel
def test_kernel_refuses_inconsistent_buffers() -> None:
    form = get_method("task_arithmetic").form(True, 1, {"weight": (1.0,), "normalize": False, "lambda": 1.0})
    a = torch.zeros(8, dtype=torch.uint8)
    b = torch.zeros(6, dtype=torch.uint8)
    with pytest.raises(ValueError, match="native input"):
        native.run_linear(form, [a, b], ["BF16", "BF16"], torch.empty(8, dtype=torch.uint8), "BF16")
    with pytest.raises(ValueError, match="contiguous uint8"):
        native.run_linear(form, [a, a], ["BF16", "BF16"], torch.empty(4, dtype=torch.int16), "BF16")


def test_non_linear_methods_have_no_form() -> None:
    assert get_method("ties").form(True, 2, {}) is None
    nuslerp = {"weight": [0.5, 0.5], "nuslerp_row_wise": False, "nuslerp_flatten": False}
    assert get_method("nuslerp").form(True, 2, nuslerp, stats=None) is None  # per-row angles: torch


def test_spherical_forms_come_from_the_statistic() -> None:
    """slerp's form is c₀·base + c₁·model with the coefficients of its Gram matrix; without one it refuses."""
    gram = [[4.0, 1.0], [1.0, 9.0]]
    form = get_method("slerp").form(True, 1, {"t": 0.3}, stats=gram)
    c0, c1 = slerp_coefficients(0.3, 4.0, 9.0, 1.0)
    assert form == LinearForm((0, 1), (c0, c1))
    with pytest.raises(TypeError, match="needs its statistic"):
        get_method("slerp").form(True, 1, {"t": 0.3})


# ---------------------------------------------------------------- whole merges


RECIPES = {
    "task_arithmetic": """
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {a}
            parameters: {{weight: [0.3, 1.0, 0.6]}}
          - model: {b}
            parameters: {{weight: 0.7}}
        parameters: {{normalize: true, lambda: 0.9}}
        dtype: {dtype}
    """,
    "slerp": """
        merge_method: slerp
        base_model: {base}
        models:
          - model: {base}
          - model: {a}
        parameters: {{t: [0.0, 0.3, 0.8, 1.0]}}
        dtype: {dtype}
    """,
    **{
        method: f"""
        merge_method: {method}
        base_model: {{base}}
        models:
          - model: {{a}}
            parameters: {{{{weight: 0.6}}}}
          - model: {{b}}
            parameters: {{{{weight: 0.4}}}}
        dtype: {{dtype}}
    """
        for method in ("multislerp", "nuslerp")
    },
    "model_stock": """
        merge_method: model_stock
        base_model: {base}
        models:
          - model: {a}
          - model: {b}
        dtype: {dtype}
    """,
    "karcher": """
        merge_method: karcher
        models:
          - model: {base}
          - model: {a}
          - model: {b}
        dtype: {dtype}
    """,
    "linear": """
        merge_method: linear
        models:
          - model: {base}
            parameters: {{weight: 0.5}}
          - model: {a}
            parameters: {{weight: 0.25}}
          - model: {b}
            parameters: {{weight: 0.25}}
        dtype: {dtype}
    """,
}


@needs_kernel
@pytest.mark.parametrize("method", sorted(RECIPES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_native_merge_equals_torch_merge(llama_family, tmp_path, write_recipe, monkeypatch, method, dtype) -> None:
    recipe = write_recipe(RECIPES[method].format(dtype=dtype, **{k: str(v) for k, v in llama_family.items()}))
    assert_native_merge_equals_torch(recipe, tmp_path, monkeypatch, native, "run_linear")


@needs_kernel
def test_add_delta_from_float32_delta(llama_family, tmp_path, write_recipe) -> None:
    """A float32 delta checkpoint applied to a bf16 base (mixed input dtypes in one kernel call)
    gives the one-step task arithmetic bit for bit."""
    fam = {k: str(v) for k, v in llama_family.items()}
    delta = write_recipe(
        f"""
        merge_method: task_vector
        base_model: {fam["base"]}
        models:
          - model: {fam["a"]}
        dtype: float32
        """,
        "delta.yaml",
    )
    run_merge(delta, tmp_path / "delta", MergeOptions(hash_inputs=False))
    apply = write_recipe(
        f"""
        merge_method: add_delta
        base_model: {fam["base"]}
        models:
          - model: {tmp_path / "delta"}
        dtype: bfloat16
        """,
        "apply.yaml",
    )
    one = write_recipe(
        f"""
        merge_method: task_arithmetic
        base_model: {fam["base"]}
        models:
          - model: {fam["a"]}
            parameters: {{weight: 1.0}}
        dtype: bfloat16
        """,
        "one.yaml",
    )
    two_step = load_tensors(run_merge(apply, tmp_path / "two", MergeOptions(hash_inputs=False)).output)
    one_step = load_tensors(run_merge(one, tmp_path / "one", MergeOptions(hash_inputs=False)).output)
    for name, t in one_step.items():
        assert torch.equal(two_step[name].view(torch.int16), t.view(torch.int16)), name
