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
from mergekitlite.cli.heatmap import NOISE_FLOOR, heatmap_figure, plot_heatmap, short_number
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


def weights(
    seed: int, base: dict[str, torch.Tensor] | None = None, scale: float = 0.1, layers: int = LAYERS
) -> dict[str, torch.Tensor]:
    """A Llama-like state dict: random, or ``base`` plus seeded noise of std ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (16, H), "model.norm.weight": (H,), "lm_head.weight": (16, H)}
    shapes |= {f"model.layers.{i}.{m}": s for i in range(layers) for m, s in MODULES.items()}
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


def panels(fig) -> dict[str, list]:
    """The heatmap's axes by kind: "grid" (layers), "strip" (tensors outside the layers)."""
    axes = [ax for ax in fig.axes if ax.images]
    return {
        "grid": [ax for ax in axes if ax.get_ylabel() == "layer"],
        "strip": [ax for ax in axes if ax.get_ylabel() != "layer"],
    }


def cell_texts(ax) -> dict[tuple[int, int], str]:
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}


def test_heatmap_has_one_scale_for_the_norms_and_shows_embedding_and_norm(models):
    pytest.importorskip("matplotlib", reason="the heatmap needs matplotlib (the 'plot' extra)")
    a, b, base = (open_model(str(models[k])) for k in ("a", "b", "base"))
    result = diff_models(a, b, base)
    fig = heatmap_figure(result)
    grids, strips = panels(fig)["grid"], panels(fig)["strip"]
    assert len(grids) == 3  # rel_a, rel_b, cosine; one column each
    norms = [ax.images[0].norm for ax in grids + strips]
    rel = [n for n in norms if n.vmin == 0.0]
    cos = [n for n in norms if n.vmin == -1.0]
    assert len(rel) == 6 and len(cos) == 3  # panels × (before strip, layers, after strip)
    assert all(n is rel[0] for n in rel), "relative-norm panels must share one colour scale"
    top = max(getattr(t, m) for t in result.tensors for m in ("rel_a", "rel_b"))
    assert rel[0].vmax == top and cos[0].vmax == 1.0
    # Every layer cell carries its number, and the strips name the tensors outside the layers.
    for ax, metric in zip(grids, ("rel_a", "rel_b", "cosine"), strict=True):
        expected = {
            (i, j): short_number(v, metric) for i, row in enumerate(result.grid(metric)) for j, v in enumerate(row)
        }
        assert cell_texts(ax) == expected
    by_name = {t.name: t for t in result.tensors}
    strip_text = {text for ax in strips for text in cell_texts(ax).values()}
    emb = by_name["model.embed_tokens.weight"]
    assert f"embed_tokens\n{short_number(emb.rel_a, 'rel_a')}" in strip_text
    assert f"norm\n{short_number(by_name['model.norm.weight'].rel_b, 'rel_b')}" in strip_text
    assert f"embed_tokens\n{short_number(emb.cosine, 'cosine')}" in strip_text


def test_heatmap_of_identical_models_is_uniform(tmp_path):
    pytest.importorskip("matplotlib", reason="the heatmap needs matplotlib (the 'plot' extra)")
    same = {k: v.to(torch.bfloat16).double() for k, v in weights(9).items()}  # the same values in both dtypes
    a, b = save(tmp_path / "a", same, torch.bfloat16), save(tmp_path / "b", same, torch.float32)
    result = diff_models(open_model(str(a)), open_model(str(b)))
    assert result.identical()
    fig = heatmap_figure(result)
    images = [ax.images[0] for group in panels(fig).values() for ax in group]
    assert all(float(abs(im.get_array()).max()) == 0.0 for im in images)
    assert all(im.norm.vmin == 0.0 and im.norm.vmax == NOISE_FLOOR for im in images)
    assert "identical" in fig.get_suptitle()


@pytest.mark.parametrize("layers", [3, 48])
def test_heatmap_layout_reads_at_3_and_48_layers(tmp_path, layers):
    pytest.importorskip("matplotlib", reason="the heatmap needs matplotlib (the 'plot' extra)")
    base = weights(0, layers=layers)
    a, b = weights(1, base, 0.1, layers), weights(2, base, 0.05, layers)
    paths = {k: save(tmp_path / k, v, torch.float32) for k, v in (("base", base), ("a", a), ("b", b))}
    result = diff_models(*(open_model(str(paths[k])) for k in ("a", "b", "base")))
    fig = heatmap_figure(result)
    grid = panels(fig)["grid"][0]
    assert [t.get_text() for t in grid.get_yticklabels()] == [str(i) for i in range(layers)]
    assert sorted(t.get_text() for t in grid.get_xticklabels()) == ["input_layernorm", "q_proj", "scale", "up_proj"]
    assert bool(grid.texts) == (layers <= 24)  # numbers while they fit, colours only beyond
    width, height = fig.get_size_inches()
    assert height >= 0.2 * layers and width < 30
    plot_heatmap(result, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes().startswith(b"\x89PNG")


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
