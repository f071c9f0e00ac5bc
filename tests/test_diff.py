"""``mergekitlite diff``: relative norms and cosines against float64 references computed here from
the full tensors; grouping by layer and module; heatmap, JSON and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekitlite.cli import main
from mergekitlite.cli.heatmap import plot_heatmap
from mergekitlite.cli.labels import module_labels as short_labels
from mergekitlite.diff import (
    DiffResult,
    diff_models,
    layer_and_module,
    open_model,
)

H = 8
LAYERS = 3
MODULES = {
    "self_attn.q_proj.weight": (H, H),
    "mlp.up_proj.weight": (2 * H, H),
    "input_layernorm.weight": (H,),
    "self_attn.scale": (),
}


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps messages at $COLUMNS when not on a terminal


def weights(seed: int, base: dict[str, torch.Tensor] | None = None, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A Llama-like state dict: random, or ``base`` plus seeded noise of std ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (16, H), "model.norm.weight": (H,), "lm_head.weight": (16, H)}
    shapes |= {f"model.layers.{i}.{m}": s for i in range(LAYERS) for m, s in MODULES.items()}
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        out[name] = noise if base is None else base[name] + scale * noise
    return out


def save(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text("{}", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diff")
    base = weights(0)
    a = weights(1, base, 0.1)
    b = weights(2, base, 0.05)
    a["model.extra.weight"] = torch.ones(3)  # only in A: reported, not compared
    b["lm_head.weight"] = torch.randn(17, H, dtype=torch.float64)  # another vocabulary size: reported
    # Mixed dtypes, as real merges have them: the reader converts each to float64.
    return {
        "base": save(root / "base", base, torch.float32),
        "a": save(root / "a", a, torch.bfloat16),
        "b": save(root / "b", b, torch.float32),
    }


def full(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.double() for k, v in load_file(str(path / "model.safetensors")).items()}


def check_against_reference(result: DiffResult, models: dict[str, Path], with_base: bool) -> None:
    a, b, base = full(models["a"]), full(models["b"]), full(models["base"])
    compared = {t.name: t for t in result.tensors}
    assert set(compared) == set(a) - {"model.extra.weight", "lm_head.weight"}
    for name, got in compared.items():
        if not with_base:
            assert got.rel_a == pytest.approx(float((a[name] - b[name]).norm() / b[name].norm()), rel=1e-12)
            assert got.rel_b is None and got.cosine is None
            continue
        da, db = a[name] - base[name], b[name] - base[name]
        assert got.rel_a == pytest.approx(float(da.norm() / base[name].norm()), rel=1e-12)
        assert got.rel_b == pytest.approx(float(db.norm() / base[name].norm()), rel=1e-12)
        assert got.cosine == pytest.approx(float(da.flatten() @ db.flatten() / (da.norm() * db.norm())), rel=1e-10)


def test_relative_norm_without_base(models):
    result = diff_models(open_model(str(models["a"])), open_model(str(models["b"])))
    check_against_reference(result, models, with_base=False)
    assert sorted(result.skipped) == [
        "lm_head.weight: shapes differ (A [16, 8], B [17, 8])",
        "model.extra.weight: not in B",
    ]


@pytest.mark.parametrize("chunk_elements", [5, 1 << 20])  # 5: one row per chunk, every tensor in many reads
def test_deltas_from_base_and_cosine(models, chunk_elements):
    a, b, base = (open_model(str(models[k])) for k in ("a", "b", "base"))
    result = diff_models(a, b, base, chunk_elements=chunk_elements)
    check_against_reference(result, models, with_base=True)
    assert "model.extra.weight: not in B, base" in result.skipped


def test_grouping_by_layer_and_module(models):
    a, b, base = (open_model(str(models[k])) for k in ("a", "b", "base"))
    result = diff_models(a, b, base)
    assert result.layers() == ["0", "1", "2"]
    assert set(result.modules()) == set(MODULES)
    assert {t.name for t in result.others()} == {"model.embed_tokens.weight", "model.norm.weight"}
    by_name = {t.name: t for t in result.tensors}
    for metric in ("rel_a", "rel_b", "cosine"):
        grid = result.grid(metric)
        for i, layer in enumerate(result.layers()):
            for j, module in enumerate(result.modules()):
                assert grid[i][j] == getattr(by_name[f"model.layers.{layer}.{module}"], metric)
    assert layer_and_module("model.layers.12.mlp.up_proj.weight", False) == ("12", "mlp.up_proj.weight")
    assert layer_and_module("vision.blocks.2.attn.qkv.weight", True) == ("vision.blocks.2", "attn.qkv.weight")
    assert layer_and_module("lm_head.weight", False) == (None, "lm_head.weight")


def test_short_labels_stay_unique():
    labels = short_labels(["self_attn.q_proj.weight", "attn.c_proj.weight", "mlp.c_proj.weight", "attn.c_attn.bias"])
    assert labels == {
        "self_attn.q_proj.weight": "q_proj",
        "attn.c_proj.weight": "attn.c_proj",
        "mlp.c_proj.weight": "mlp.c_proj",
        "attn.c_attn.bias": "c_attn.bias",
    }


def test_zero_delta_has_no_cosine(tmp_path):
    same = weights(5)
    a, base = save(tmp_path / "a", same, torch.float32), save(tmp_path / "base", same, torch.float32)
    b = save(tmp_path / "b", weights(6, same), torch.float32)
    result = diff_models(open_model(str(a)), open_model(str(b)), open_model(str(base)))
    assert all(t.rel_a == 0.0 and math.isnan(t.cosine) for t in result.tensors)
    assert all(v["cosine"] is None for v in result.to_json()["tensors"])  # NaN is not JSON


def test_heatmap_png(models, tmp_path):
    pytest.importorskip("matplotlib", reason="the heatmap needs matplotlib (the 'plot' extra)")
    a, b, base = (open_model(str(models[k])) for k in ("a", "b", "base"))
    png = tmp_path / "out" / "heat.png"
    plot_heatmap(diff_models(a, b, base), png)
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000


def test_cli(models, tmp_path, capsys):
    js = tmp_path / "d.json"
    argv = ["diff", str(models["a"]), str(models["b"]), "--base", str(models["base"]), "--json", str(js)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "cos(A−base, B−base)" in out and "q_proj" in out and "not compared (2)" in out
    data = json.loads(js.read_text(encoding="utf-8"))
    assert data["layers"] == ["0", "1", "2"] and len(data["tensors"]) == 2 + LAYERS * len(MODULES)
    assert main(["diff", str(models["a"]), str(models["b"]), "--long"]) == 0
    assert "model.norm.weight" in capsys.readouterr().out


def test_cli_missing_model(models, tmp_path, capsys):
    assert main(["diff", str(models["a"]), str(tmp_path / "nope"), "-q"]) == 2
    assert "no such folder" in capsys.readouterr().err
