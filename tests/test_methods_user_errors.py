"""Parameter values a method cannot take, and inputs its arithmetic cannot handle, through the command
line: exit 2 and one line naming the place (file:line:col for a recipe value, the tensor for data)."""

from __future__ import annotations

import re
from pathlib import Path

import builders
import pytest
import torch

from mergekitlite.cli import main, merge_main

TENSOR = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per message, whatever its length


def where(text: str, needle: str) -> tuple[int, int]:
    """1-based (line, column) of ``needle`` in ``text``."""
    pos = text.index(needle)
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


def validate(capsys: pytest.CaptureFixture[str], recipe: Path) -> tuple[int, str]:
    code = main(["validate", str(recipe)])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


# ---------------------------------------------------------------------------------------------
# Literal values in the recipe


TIES = """\
merge_method: ties
base_model: base
parameters:
  normalize: true{global_extra}
models:
  - model: a
    parameters:
      weight: 1.0
      density: {density}
  - model: b
    parameters:
      weight: {weight}
      density: 0.5
"""


@pytest.mark.parametrize(
    ("density", "weight", "global_extra", "needle", "key", "message"),
    [
        ("1.5", "1.0", "", "1.5", "models[0].parameters.density", "must be between 0 and 1, got 1.5"),
        ("-0.2", "1.0", "", "-0.2", "models[0].parameters.density", "must be between 0 and 1, got -0.2"),
        ("[0.2, 1.25]", "1.0", "", "1.25", "models[0].parameters.density[1]", "must be between 0 and 1, got 1.25"),
        ("0.5", ".nan", "", ".nan", "models[1].parameters.weight", "expected a finite number, got .nan"),
        ("0.5", "-.inf", "", "-.inf", "models[1].parameters.weight", "expected a finite number, got -.inf"),
        (
            "[{filter: mlp, value: 2}, {value: 0.5}]",
            "1.0",
            "",
            "2}",
            "models[0].parameters.density[0].value",
            "must be between 0 and 1, got 2",
        ),
        (
            "{filter: mlp, value: [0.5, -1]}",
            "1.0",
            "",
            "-1]",
            "models[0].parameters.density.value[1]",
            "must be between 0 and 1, got -1",
        ),
        ("0.5", "1.0", "\n  density: 7", "7", "parameters.density", "must be between 0 and 1, got 7"),
        ("0.5", "1.0", "\n  lambda: .inf", ".inf", "parameters.lambda", "expected a finite number, got .inf"),
    ],
)
def test_out_of_range_value_is_a_recipe_error_at_the_value(
    write_recipe, capsys, density: str, weight: str, global_extra: str, needle: str, key: str, message: str
) -> None:
    text = TIES.format(density=density, weight=weight, global_extra=global_extra)
    recipe = write_recipe(text)
    code, err = validate(capsys, recipe)
    line, col = where(text, needle)
    assert code == 2, err
    assert f"{recipe}:{line}:{col}: {key}: {message}" in err
    assert err.count(f"{key}:") == 1  # reported once


def test_rule_and_slice_values_are_checked_against_their_method(write_recipe, capsys) -> None:
    text = """\
merge_method: slerp
base_model: base
slices:
  - sources:
      - model: base
        layer_range: [0, 2]
      - model: b
        layer_range: [0, 2]
        parameters:
          t: 1.75
rules:
  - match: "*mlp*"
    method: della
    parameters:
      density: 0.5
      epsilon: 0.75
  - match: "*attn*"
    method: linear
    parameters:
      t: 9
"""
    recipe = write_recipe(text)
    code, err = validate(capsys, recipe)
    assert code == 2, err
    line, col = where(text, "1.75")
    assert f"{recipe}:{line}:{col}: slices[0].sources[1].parameters.t: must be between 0 and 1, got 1.75" in err
    line, col = where(text, "0.75")
    assert f"{recipe}:{line}:{col}: rules[0].parameters.epsilon: must be at least 0 and less than 0.5, got 0.75" in err
    assert "9" not in err.replace(str(recipe), "")  # linear has no t: a warning, not a range error


def test_in_range_values_validate(write_recipe, capsys) -> None:
    recipe = write_recipe(TIES.format(density="[0, 0.5, 1]", weight="-2.5", global_extra="\n  lambda: 0.9"))
    code, err = validate(capsys, recipe)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# Inputs a method's arithmetic cannot handle: the merge stops with the tensor's name


def family(tmp_path: Path, llama_family: dict[str, Path], tensors: dict[str, torch.Tensor]) -> dict[str, Path]:
    """The llama family's models, with ``TENSOR`` replaced in each model named in ``tensors`` (a name
    that is not in the family, such as "c", is a copy of "a")."""
    out = dict(llama_family)
    for name, tensor in tensors.items():
        src = llama_family.get(name, llama_family["a"])
        weights = builders.load_tensors(src)
        weights[TENSOR] = tensor.to(torch.bfloat16)
        out[name] = builders.write_safetensors_model(tmp_path / name, weights, builders.read_config(src))
    return out


def merge(capsys: pytest.CaptureFixture[str], write_recipe, out: Path, text: str) -> tuple[int, str]:
    code = merge_main([str(write_recipe(text)), str(out), "--no-hash"])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def offsets() -> torch.Tensor:
    """A [32, 16] tensor of bf16-exact values (so that its negation is exact too)."""
    return torch.arange(-256, 256, dtype=torch.float32).reshape(32, 16) / 64


def models_list(fam: dict[str, Path], names: list[str], weights: list[float] | None = None) -> str:
    lines = []
    for i, name in enumerate(names):
        lines.append(f"  - model: {fam[name]}")
        if weights is not None:
            lines.append(f"    parameters: {{weight: {weights[i]}}}")
    return "\n".join(lines) + "\n"


def names_a_tensor(err: str, model: Path) -> bool:
    """Whether the message names one of the model's tensors (each of them fails alike)."""
    return any(name in err for name in builders.load_tensors(model))


def assert_names_the_tensor(code: int, err: str, *phrases: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if all(p in line for p in phrases)]
    assert lines, f"no line with {phrases}: {err}"
    assert TENSOR in lines[0], lines[0]
    assert "Traceback" not in err


def test_model_stock_with_opposite_offsets(tmp_path, llama_family, write_recipe, capsys) -> None:
    zero = torch.zeros(32, 16)
    fam = family(tmp_path, llama_family, {"base": zero, "a": offsets(), "b": -offsets()})
    text = f"merge_method: model_stock\nbase_model: {fam['base']}\nmodels:\n" + models_list(fam, ["a", "b"])
    code, err = merge(capsys, write_recipe, tmp_path / "out", text)
    assert_names_the_tensor(code, err, "model_stock", "mean cosine -1.0", "divides by zero", "another method")


def test_multislerp_with_balancing_antipodal_inputs(tmp_path, llama_family, write_recipe, capsys) -> None:
    zero = torch.zeros(32, 16)
    fam = family(tmp_path, llama_family, {"base": zero, "a": offsets(), "b": -offsets(), "c": offsets()})
    text = f"merge_method: multislerp\nbase_model: {fam['base']}\nmodels:\n" + models_list(
        fam, ["a", "b", "c"], [1.0, 2.0, 1.0]
    )
    code, err = merge(capsys, write_recipe, tmp_path / "out", text)
    assert_names_the_tensor(code, err, "multislerp", "antipodal", "use different weights")


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize(("method", "bad"), [("karcher", torch.inf), ("slerp", torch.nan)])
def test_spherical_methods_with_non_finite_values(
    tmp_path, llama_family, write_recipe, capsys, method: str, bad: float, native: bool
) -> None:
    """A NaN or ±inf makes the angle, and so every element, NaN: an error naming the tensor, not a NaN tensor."""
    broken = offsets()
    broken[3, 4] = bad
    fam = family(tmp_path, llama_family, {"a": broken})
    if method == "slerp":
        text = f"merge_method: slerp\nbase_model: {fam['b']}\nparameters: {{t: 0.5}}\nmodels:\n" + models_list(
            fam, ["b", "a"]
        )
    else:
        text = f"merge_method: {method}\nmodels:\n" + models_list(fam, ["a", "b"])
    code = merge_main(
        [str(write_recipe(text)), str(tmp_path / "out"), "--no-hash", *([] if native else ["--no-native"])]
    )
    captured = capsys.readouterr()
    assert_names_the_tensor(code, captured.err + captured.out, method, "NaN or infinite values")


@pytest.mark.parametrize(
    ("method", "weights", "phrase"),
    [("multislerp", [0.5, -0.5], "normalize_weights"), ("linear", [1.0, -1.0], "normalize")],
)
def test_weights_summing_to_zero_with_normalization(
    tmp_path, llama_family, write_recipe, capsys, method: str, weights: list[float], phrase: str
) -> None:
    text = f"merge_method: {method}\nmodels:\n" + models_list(llama_family, ["a", "b"], weights)
    code, err = merge(capsys, write_recipe, tmp_path / "out", text)
    assert code == 2, err
    assert re.search(rf"{re.escape(method)}.*sum to 0|sum to 0.*{phrase}", err), err
    assert names_a_tensor(err, llama_family["a"])
    assert "Traceback" not in err


def test_della_epsilon_outside_the_density(tmp_path, llama_family, write_recipe, capsys) -> None:
    text = (
        f"merge_method: della\nbase_model: {llama_family['base']}\nmodels:\n"
        f"  - model: {llama_family['a']}\n    parameters: {{weight: 1.0, density: 0.1}}\n"
    )
    code, err = merge(capsys, write_recipe, tmp_path / "out", text)
    assert code == 2, err
    assert "density ± epsilon must lie inside (0, 1), got density 0.1 and epsilon 0.15" in err
    assert names_a_tensor(err, llama_family["a"])
    assert "Traceback" not in err
