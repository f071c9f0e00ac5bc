"""NaN/±inf met while merging: counted per tensor (inputs read, outputs written, overflows on the cast),
reported in one warning line per tensor, recorded in mergekitlite.json and the resume journal, and
refused by ``--strict`` (exit 2, the output left in OUT.partial).

Checkpoints are built here with NaN and ±inf planted at known places and float32 values that overflow
float16; every expected count is computed with torch from the files (inputs) and from the output
(outputs), independently of the package's counting. The native kernel and ``--no-native`` must agree
on counts and bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import builders
import pytest
import torch
from builders import load_tensors

from mergekitlite.api import MergeOptions, run_merge
from mergekitlite.cli import merge_main
from mergekitlite.methods import get_method, native
from mergekitlite.methods.linear_form import evaluate
from mergekitlite.nonfinite import REPORT_LIMIT, NonFinite, report_lines

needs_kernel = pytest.mark.skipif(not native.available(), reason="the native kernel is not built here")
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
COLS = 1536  # rows of 1.5 kernel blocks: planted values fall in several blocks
NAN_IN = "model.layers.0.mlp.up_proj.weight"  # NaN in a, inf in b: NaN/inf out
OVERFLOW = "model.layers.0.input_layernorm.weight"  # finite float32 that overflows float16
CLEAN = "model.layers.1.mlp.up_proj.weight"
MASKED = "model.layers.1.input_layernorm.weight"  # one NaN in b, for DARE to drop


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Path]:
    """base, a, b: float32 tensors; a and b are small perturbations of base plus planted values."""
    root = tmp_path_factory.mktemp("planted")
    cfg = {"model_type": "toy", "num_hidden_layers": 2}
    g = torch.Generator().manual_seed(11)
    base = {
        NAN_IN: torch.randn(48, COLS, generator=g),
        OVERFLOW: torch.randn(COLS, generator=g),
        CLEAN: torch.randn(16, COLS, generator=g),
        MASKED: torch.randn(COLS, generator=g),
    }
    base[OVERFLOW][[3, 1500]] = torch.tensor([60000.0, -60000.0])  # finite in every input
    models = {"base": base}
    for k, name in enumerate(("a", "b")):
        noise = torch.Generator().manual_seed(100 + k)
        models[name] = {n: t + 0.01 * torch.randn(t.shape, generator=noise) for n, t in base.items()}
    models["a"][NAN_IN].view(-1)[[0, 5, 1024, 40000]] = float("nan")
    models["b"][NAN_IN].view(-1)[[5, 7, 70000]] = torch.tensor([float("inf"), -float("inf"), float("inf")])
    models["a"][OVERFLOW][[3, 1500]] += torch.tensor([8000.0, -8000.0])  # base + (a − base): ±68000 → ±inf
    models["b"][MASKED][77] = float("nan")
    return {name: builders.write_safetensors_model(root / name, t, cfg) for name, t in models.items()}


TASK_ARITHMETIC = """
    merge_method: task_arithmetic
    base_model: {base}
    models:
      - model: {a}
        parameters: {{weight: 1.0}}
      - model: {b}
        parameters: {{weight: 0.5}}
    dtype: float16
"""


def _nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def expected_counts(planted: dict[str, Path], out: Path, weights: dict[str, float]) -> dict[str, dict]:
    """Per tensor, from the files alone: NaN/inf in each input, in the output, and the output values
    whose float32 result (computed here) was finite: the overflows."""
    inputs = {name: load_tensors(path) for name, path in planted.items()}
    merged = load_tensors(out)
    found = {}
    for tensor, value in merged.items():
        by_model = {str(planted[m]): _nonfinite(inputs[m][tensor]) for m in planted}
        by_model = {m: n for m, n in by_model.items() if n}
        f32 = builders.ref_task_arithmetic(
            inputs["base"][tensor], [inputs[m][tensor] for m in weights], list(weights.values())
        )
        overflow = int((~torch.isfinite(value) & torch.isfinite(f32)).sum())
        counts = {
            "nonfinite_inputs": sum(by_model.values()),
            "nonfinite_outputs": _nonfinite(value),
            "overflow_on_cast": overflow,
            "by_model": by_model,
        }
        if counts["nonfinite_inputs"] or counts["nonfinite_outputs"]:
            found[tensor] = counts
    return found


def _recorded(out: Path) -> dict[str, dict]:
    """The provenance record, with model references (here: paths) as they are."""
    return json.loads((out / "mergekitlite.json").read_text())["nonfinite"]


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_counts_per_tensor_match_torch(planted, tmp_path, write_recipe, use_native) -> None:
    if use_native and not native.available():
        pytest.skip("the native kernel is not built here")
    recipe = write_recipe(TASK_ARITHMETIC.format(**{k: str(v) for k, v in planted.items()}))
    result = run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False, native=use_native))
    expected = expected_counts(planted, result.output, {"a": 1.0, "b": 0.5})
    # The planted values, so that the reference itself is checked: 4 NaN + 3 inf in, 2 overflows.
    assert expected[NAN_IN]["nonfinite_inputs"] == 7 and expected[NAN_IN]["overflow_on_cast"] == 0
    assert expected[OVERFLOW] == {
        "nonfinite_inputs": 0,
        "nonfinite_outputs": 2,
        "overflow_on_cast": 2,
        "by_model": {},
    }
    assert expected[MASKED]["nonfinite_outputs"] == 1  # task arithmetic masks nothing
    assert CLEAN not in expected
    assert _recorded(result.output) == expected
    assert {n: f.to_json() for n, f in result.nonfinite.items()} == expected
    assert list(_recorded(result.output)) == [t.name for t in result.plan.tasks if t.name in expected]


@needs_kernel
def test_native_and_torch_agree_on_counts_and_bytes(planted, tmp_path, write_recipe) -> None:
    recipe = write_recipe(TASK_ARITHMETIC.format(**{k: str(v) for k, v in planted.items()}))
    fast = run_merge(recipe, tmp_path / "native", MergeOptions(hash_inputs=False))
    slow = run_merge(recipe, tmp_path / "torch", MergeOptions(hash_inputs=False, native=False))
    assert _recorded(fast.output) == _recorded(slow.output)
    a, b = load_tensors(fast.output), load_tensors(slow.output)
    for name in a:
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def test_warning_lines(planted, tmp_path, write_recipe, capsys) -> None:
    recipe = write_recipe(TASK_ARITHMETIC.format(**{k: str(v) for k, v in planted.items()}))
    out = tmp_path / "out"
    assert merge_main([str(recipe), str(out), "--no-hash"]) == 0
    text = " ".join((capsys.readouterr().out).split())
    assert (
        f"warning: tensor {NAN_IN}: 6 NaN/inf output value(s) after the cast to F16; "
        f"7 NaN/inf input value(s) in {planted['a']} (4), {planted['b']} (3)"
    ) in text
    assert (
        f"warning: tensor {OVERFLOW}: 2 NaN/inf output value(s) after the cast to F16 "
        "(2 of them finite before the cast: overflow)"
    ) in text
    assert CLEAN not in text
    assert out.is_dir()


def test_strict_refuses_and_leaves_the_partial_output(planted, tmp_path, write_recipe, capsys) -> None:
    recipe = write_recipe(TASK_ARITHMETIC.format(**{k: str(v) for k, v in planted.items()}))
    out = tmp_path / "out"
    assert merge_main([str(recipe), str(out), "--no-hash", "-q", "--strict"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    # The first tensor in the plan's order (layer 0's norm, then its MLP).
    assert err.startswith(f"error: --strict: tensor {OVERFLOW}: 2 NaN/inf output value(s)"), err
    assert "(and 2 more tensors); use `dtype: float32` or `dtype: bfloat16`" in err
    assert f"or merge without --strict to accept it (the merge is left in {out.with_name('out.partial')})" in err
    assert not out.exists()
    partial = out.with_name("out.partial")
    assert builders.journal_done(partial) == {NAN_IN, OVERFLOW, CLEAN, MASKED}
    # --resume --strict still refuses (the counts are in the journal); --resume alone accepts, warning.
    assert merge_main([str(recipe), str(out), "--no-hash", "-q", "--strict", "--resume"]) == 2
    assert f"--strict: tensor {OVERFLOW}: 2 NaN/inf" in " ".join(capsys.readouterr().err.split())
    assert merge_main([str(recipe), str(out), "--no-hash", "--resume"]) == 0
    assert f"tensor {OVERFLOW}: 2 NaN/inf output" in " ".join(capsys.readouterr().out.split())
    assert _recorded(out) == expected_counts(planted, out, {"a": 1.0, "b": 0.5})


def test_strict_names_the_overflow_fix(planted, tmp_path, write_recipe, capsys) -> None:
    """Only an overflow: the line says to use a wider output dtype. The models are a without its NaN
    (its overflowing values kept) and the base in b's place (b's inf and NaN gone)."""
    recipe = write_recipe(
        TASK_ARITHMETIC.replace("{b}", "{base}").format(**{k: str(v) for k, v in planted.items() if k != "b"})
    )
    clean_a = builders.write_safetensors_model(
        tmp_path / "a_clean",
        {n: torch.nan_to_num(t, nan=0.0) if n != OVERFLOW else t for n, t in load_tensors(planted["a"]).items()},
        builders.read_config(planted["a"]),
    )
    recipe.write_text(recipe.read_text().replace(str(planted["a"]), str(clean_a)))
    out = tmp_path / "out"
    assert merge_main([str(recipe), str(out), "--no-hash", "-q", "--strict"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--strict: tensor {OVERFLOW}: 2 NaN/inf output value(s) after the cast to F16 (2 of them" in err
    assert "use `dtype: float32` or `dtype: bfloat16`" in err and "and 1 more" not in err
    assert not out.exists()
    # The same recipe with a float32 output is clean: strict passes, nothing recorded.
    recipe.write_text(recipe.read_text().replace("dtype: float16", "dtype: float32"))
    assert merge_main([str(recipe), str(tmp_path / "wide"), "--no-hash", "-q", "--strict"]) == 0
    assert _recorded(tmp_path / "wide") == {}


def test_masked_input_nan_only_warns_under_strict(planted, tmp_path, write_recipe, capsys) -> None:
    """DARE drops the element that holds b's NaN: the input is counted, the output is finite, and
    --strict finalises the merge with a warning."""
    recipe = write_recipe(
        f"""
        merge_method: dare_linear
        base_model: {planted["base"]}
        models:
          - model: {planted["b"]}
            parameters: {{weight: 1.0, density: 0.05}}
        dtype: float32
        parameters: {{rescale: false}}
        """
    )
    out = tmp_path / "out"
    assert merge_main([str(recipe), str(out), "--no-hash", "--strict", "--random-seed", "3"]) == 0
    merged = load_tensors(out)
    assert _nonfinite(merged[MASKED]) == 0
    recorded = _recorded(out)
    assert recorded[MASKED] == {
        "nonfinite_inputs": 1,
        "nonfinite_outputs": 0,
        "overflow_on_cast": 0,
        "by_model": {str(planted["b"]): 1},
    }
    text = " ".join(capsys.readouterr().out.split())
    assert f"tensor {MASKED}: 1 NaN/inf input value(s) in {planted['b']} (1); the merge masked them" in text


def test_report_is_capped() -> None:
    found = {f"t{i}": NonFinite(inputs=1, by_model={"m": 1}) for i in range(REPORT_LIMIT + 3)}
    lines = report_lines(found, list(found), {"m": "/models/m"})
    assert len(lines) == REPORT_LIMIT + 1
    assert (
        lines[0] == "tensor t0: 1 NaN/inf input value(s) in /models/m (1); the merge masked them (the output is finite)"
    )
    assert lines[-1] == "and 3 more tensors with NaN/inf values (all in mergekitlite.json)"


def test_kernel_results_sum_per_model() -> None:
    """Any kernel returns (nonfinite_in, nonfinite_out, overflow) per chunk, nonfinite_in a total or
    one count per input; chunks add up, a model read twice is summed."""
    one = NonFinite.from_kernel(((2, 0, 3), 4, 1), ["base", "a", "base"])
    total = NonFinite.from_kernel((5, 1, 0))
    assert one + total == NonFinite(10, 5, 1, {"base": 5})
    assert NonFinite.from_json((one + total).to_json()) == one + total


def _random_bits(code: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if code == "F32":
        x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-10, 130, (n,), generator=gen).float())
        x[torch.randint(0, n, (n // 50,), generator=gen)] = float("nan")
        return x
    return torch.randint(-(2**15), 2**15, (n,), generator=gen, dtype=torch.int16).view(DTYPES[code])


@needs_kernel
@pytest.mark.parametrize("out_code", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("in_codes", [("BF16", "BF16", "BF16"), ("F16", "F32", "BF16"), ("F32", "F32", "F32")])
def test_kernel_counts_equal_torch(in_codes, out_code) -> None:
    """Random bit patterns (NaN, ±inf, huge values) over lengths around the 1024-value block; the
    kernel's counts equal torch's: per input, in the output, and outputs finite in float32 before the
    cast. The form's third input is unused by it and still counted."""
    gen = torch.Generator().manual_seed(hash((in_codes, out_code)) % 2**31)
    form = get_method("task_arithmetic").form(True, 1, {"weight": (0.5,), "normalize": False, "lambda": 1.0})
    for n in (1, 1023, 1025, 5000):
        xs = [_random_bits(c, n, gen) for c in in_codes]
        # Mostly finite blocks too, so that the fast path (a finite block is not counted) is taken.
        for x in xs:
            x[: n // 2] = torch.randn(n // 2, generator=gen).to(x.dtype)
        out = torch.empty(n * DTYPES[out_code].itemsize, dtype=torch.uint8)
        found = native.run_linear(form, [x.view(torch.uint8) for x in xs], list(in_codes), out, out_code)
        f32 = evaluate(form, [x.float() for x in xs])
        written = out.view(DTYPES[out_code])
        assert found == (
            tuple(_nonfinite(x) for x in xs),
            _nonfinite(written),
            int((~torch.isfinite(written) & torch.isfinite(f32)).sum()),
        ), (in_codes, out_code, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_torch_path_count_per_dtype(dtype) -> None:
    """The torch path's count: exact with NaN/±inf planted, 0 for finite values whose sum overflows
    the dtype (the fast test's false alarm falls back to counting), 0 for non-float tensors."""
    from mergekitlite.execute import count_nonfinite

    big = torch.full((4096,), torch.finfo(dtype).max / 2, dtype=dtype)
    assert count_nonfinite(big) == 0
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert count_nonfinite(x) == 0
    x[[1, 2, 4999]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    assert count_nonfinite(x) == 3 == _nonfinite(x)
    assert count_nonfinite(torch.arange(10)) == 0


def test_copies_count_what_they_pass_through(planted, tmp_path, write_recipe, capsys) -> None:
    """A tensor copied as it is (passthrough of one model, same dtype) holds what its input holds:
    counted without torch, from the raw bytes, as read and as written; --strict refuses it."""
    recipe = write_recipe(
        f"""
        merge_method: passthrough
        slices:
          - sources:
              - model: {planted["a"]}
                layer_range: [0, 2]
        dtype: float32
        """
    )
    out = tmp_path / "out"
    assert merge_main([str(recipe), str(out), "--no-hash"]) == 0
    assert _recorded(out) == {
        NAN_IN: {
            "nonfinite_inputs": 4,
            "nonfinite_outputs": 4,
            "overflow_on_cast": 0,
            "by_model": {str(planted["a"]): 4},
        }
    }
    assert merge_main([str(recipe), str(tmp_path / "strict"), "--no-hash", "--strict"]) == 2
    assert f"--strict: tensor {NAN_IN}: 4 NaN/inf output value(s)" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("code", ["BF16", "F16", "F32", "F64"])
def test_raw_count_without_torch(code) -> None:
    from mergekitlite.execute import count_raw

    dtype = {"F64": torch.float64, **DTYPES}[code]
    x = torch.randn(3000, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[-1] = torch.finfo(dtype).max  # the largest finite value is not counted
    assert count_raw(x.view(torch.uint8).numpy(), code) == 0
    x[[0, 10, 2999]] = torch.tensor([float("nan"), -float("inf"), float("inf")], dtype=dtype)
    assert count_raw(x.view(torch.uint8).numpy(), code) == 3 == _nonfinite(x)
    assert count_raw(x.view(torch.uint8).numpy(), "I32") == 0
