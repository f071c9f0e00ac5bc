"""The single final cast: float64 results reach bf16/fp16 with one correct rounding (torch alone
rounds twice, through float32)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch

from mergekitlite.rounding import narrow_once


def nearest(value: float, dtype: torch.dtype) -> float:
    """The correctly rounded ``dtype`` value of ``value`` (ties to even), by exact arithmetic over the
    three candidates around torch's own (possibly double-rounded) answer."""
    bits_dtype = torch.int16
    guess = torch.tensor([value], dtype=torch.float64).to(dtype).view(bits_dtype).item()
    candidates = [torch.tensor([guess + d], dtype=bits_dtype).view(dtype).item() for d in (-1, 0, 1)]
    exact = Fraction(value)

    def key(c: float) -> tuple[Fraction, int]:
        odd = torch.tensor([c], dtype=dtype).view(bits_dtype).item() & 1
        return abs(Fraction(c) - exact), odd

    return min(candidates, key=key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_near_midpoints_round_once(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(3000, generator=g).to(dtype).double()
    ulp = (grid.to(dtype).view(torch.int16) + 1).view(dtype).double() - grid
    # Just above and just below the midpoints between neighbours: where double rounding goes wrong.
    jitter = torch.randn(3000, generator=g, dtype=torch.float64) * 2.0**-28
    values = torch.cat([grid + ulp / 2 * (1 + jitter.abs()), grid + ulp / 2 * (1 - jitter.abs()), grid + ulp / 2])
    got = narrow_once(values, dtype).tolist()
    want = [nearest(v, dtype) for v in values.tolist()]
    assert got == want
    # the case that motivated it: torch's own conversion gets some of these wrong
    assert values.to(dtype).tolist() != want


def test_special_values_and_other_dtypes_pass_through() -> None:
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, 3.0], dtype=torch.float64)
    out = narrow_once(x, torch.bfloat16)
    assert out.tolist() == x.to(torch.bfloat16).tolist()
    assert torch.signbit(out[1])
    assert torch.isnan(narrow_once(torch.tensor([float("nan")], dtype=torch.float64), torch.bfloat16)).all()
    y = torch.randn(100, dtype=torch.float32)
    assert torch.equal(narrow_once(y, torch.bfloat16), y.to(torch.bfloat16))


def test_float64_compute_is_rounded_once_in_a_merge(tmp_path: Path) -> None:
    """0.5·1 + (0.5 + 2⁻³⁰)·1.0078125 lies just above the bf16 midpoint 1.00390625: the right answer
    is 1.0078125; rounding through float32 lands on the midpoint and then on 1.0."""
    import builders

    from mergekitlite import MergeOptions, run_merge

    cfg = {"model_type": "toy", "num_hidden_layers": 1}
    a = builders.write_safetensors_model(tmp_path / "a", {"w": torch.ones(4, dtype=torch.bfloat16)}, cfg)
    b = builders.write_safetensors_model(tmp_path / "b", {"w": torch.full((4,), 1.0078125, dtype=torch.bfloat16)}, cfg)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: linear\ncompute_dtype: float64\nparameters: {normalize: false}\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: {0.5 + 2.0**-30!r}}}\n"
    )
    out = run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False)).output
    merged = builders.load_tensors(out)["w"]
    assert merged.dtype == torch.bfloat16
    assert merged.tolist() == [1.0078125] * 4
