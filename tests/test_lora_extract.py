"""``extract-lora``: the adapter of FINETUNED − BASE. Its factors are read back with safetensors and checked
against numpy's SVD; the reported errors against ‖ΔW − B·A‖ computed here; the adapter applied to the base
(through a ``base+adapter`` recipe input, and through peft) against the fine-tune."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import builders
import numpy as np
import pytest
import torch
from safetensors import safe_open

from mergekitlite.cli import main, merge_main

P = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


def _finetune(base: Path, dst: Path, seed: int) -> Path:
    """A fine-tune of ``base``: rank-2 deltas on q_proj, full-rank ones on the MLP, shifted norms and embedding rows;
    k_proj and v_proj unchanged."""
    gen = torch.Generator().manual_seed(seed)
    tensors = builders.load_tensors(base)
    out = {}
    for name, t in tensors.items():
        x = t.float()
        if "q_proj" in name:
            x = x + (torch.randn(x.shape[0], 2, generator=gen) @ torch.randn(2, x.shape[1], generator=gen)) * 0.05
        elif "mlp" in name or "o_proj" in name or "lm_head" in name or "embed" in name:
            x = x + torch.randn(x.shape, generator=gen) * 0.02
        elif "norm" in name:
            x = x + 0.1
        out[name] = x.to(t.dtype)
    builders.write_safetensors_model(dst, out, builders.read_config(base))
    return dst


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("extract")
    base = builders.make_llama(root / "base", seed=21, dtype=torch.float32)
    return {"base": base, "ft": _finetune(base, root / "ft", 22)}


def extract(capsys, ft: Path, base: Path, out: Path, *args: str) -> tuple[int, str]:
    code = main(["extract-lora", str(ft), "--base", str(base), str(out), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def factors(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def report(out: Path) -> dict[str, dict]:
    return {e["tensor"]: e for e in json.loads((out / "lora_report.json").read_text())["tensors"]}


def delta64(family: dict[str, Path], name: str) -> np.ndarray:
    ft, base = builders.load_tensors(family["ft"])[name], builders.load_tensors(family["base"])[name]
    return ft.double().numpy() - base.double().numpy()


def apply(tmp_path: Path, base: Path, adapter: Path, name: str = "applied") -> dict[str, torch.Tensor]:
    r = tmp_path / f"{name}.yaml"
    r.write_text(f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\ndtype: float32\n")
    assert merge_main([str(r), str(tmp_path / name), "-q", "--no-hash"]) == 0
    return builders.load_tensors(tmp_path / name)


def test_full_rank_reproduces_the_finetune(tmp_path, family, capsys):
    code, text = extract(capsys, family["ft"], family["base"], tmp_path / "ad", "--rank", "64")
    assert code == 0, text
    rep = report(tmp_path / "ad")
    assert rep[Q0 + ".weight"]["rank"] == 2  # the delta's own rank: zero singular values are not kept
    assert rep["model.layers.0.mlp.up_proj.weight"]["rank"] == 16
    assert rep["model.layers.0.self_attn.k_proj.weight"]["kind"] == "unchanged"
    assert all(e["rel_error"] < 1e-5 for e in rep.values()), {k: e["rel_error"] for k, e in rep.items()}
    assert rep["model.embed_tokens.weight"]["kind"] == "saved" and rep["model.norm.weight"]["kind"] == "saved"
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 16
    assert cfg["rank_pattern"][r"model\.layers\.0\.self_attn\.q_proj"] == 2
    assert cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert "model.embed_tokens" in cfg["modules_to_save"] and "model.layers.0.input_layernorm" in cfg["modules_to_save"]
    assert "k_proj" not in cfg["target_modules"]
    got = apply(tmp_path, family["base"], tmp_path / "ad")
    ft = builders.load_tensors(family["ft"])
    for name, t in ft.items():
        scale = float(t.abs().max())
        assert float((got[name] - t).abs().max()) <= 1e-5 * max(scale, 1.0), name
    assert torch.equal(got["model.embed_tokens.weight"], ft["model.embed_tokens.weight"])  # saved whole: exact
    assert "overall ‖ΔW − B·A‖ / ‖ΔW‖" in text and "model.layers.*.mlp.up_proj" in text


def test_low_rank_error_is_what_the_report_says(tmp_path, family, capsys):
    code, text = extract(capsys, family["ft"], family["base"], tmp_path / "ad", "--rank", "3")
    assert code == 0, text
    rep, f = report(tmp_path / "ad"), factors(tmp_path / "ad")
    got = apply(tmp_path, family["base"], tmp_path / "ad")
    ft = builders.load_tensors(family["ft"])
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.o_proj.weight"):
        module = name.removesuffix(".weight")
        a = f[P + module + ".lora_A.weight"].double().numpy()
        b = f[P + module + ".lora_B.weight"].double().numpy()
        assert a.shape[0] == b.shape[1] == 3
        d = delta64(family, name)
        err = np.linalg.norm(d - b @ a) / np.linalg.norm(d)
        # ΔW is formed in float32 (FT − BASE rounded once per element); here it is exact: equal to ~1e-7.
        assert math.isclose(rep[name]["rel_error"], err, rel_tol=1e-6), name
        s = np.linalg.svd(d, compute_uv=False)
        assert math.isclose(err, math.sqrt((s[3:] ** 2).sum() / (s**2).sum()), rel_tol=1e-4), name  # the SVD optimum
        assert math.isclose(rep[name]["energy"], (s[:3] ** 2).sum() / (s**2).sum(), rel_tol=1e-5)
        # The adapter applied to the base misses the fine-tune by exactly that share of the delta.
        applied = np.linalg.norm(got[name].double().numpy() - ft[name].double().numpy()) / np.linalg.norm(d)
        assert math.isclose(applied, err, rel_tol=1e-4), name


def test_energy_and_module_ranks_choose_each_rank(tmp_path, family, capsys):
    code, text = extract(
        capsys, family["ft"], family["base"], tmp_path / "ad", "--energy", "0.6", "--module-rank", "o_proj=1"
    )
    assert code == 0, text
    rep, f = report(tmp_path / "ad"), factors(tmp_path / "ad")
    for name, e in rep.items():
        if e["kind"] != "lora":
            continue
        s2 = np.linalg.svd(delta64(family, name), compute_uv=False) ** 2
        want = int(np.searchsorted(np.cumsum(s2) / s2.sum(), 0.6) + 1)
        if "o_proj" in name:
            want = min(want, 1)
        assert e["rank"] == want, name
        assert f[P + name.removesuffix(".weight") + ".lora_A.weight"].shape[0] == want
        assert e["energy"] >= 0.6 - 1e-6 or "o_proj" in name
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"][r"model\.layers\.1\.self_attn\.o_proj"] == 1


def test_peft_loads_the_adapter_and_merges_it_like_a_recipe_input(tmp_path, family, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    code, text = extract(
        capsys, family["ft"], family["base"], tmp_path / "ad", "--rank", "5", "--module-rank", "mlp=3", "--embed-lora"
    )
    assert code == 0, text
    f = factors(tmp_path / "ad")
    assert f[P + "model.embed_tokens.lora_embedding_A"].shape == (5, 64)  # [r, vocab]
    assert f[P + "model.embed_tokens.lora_embedding_B"].shape == (16, 5)  # [hidden, r]
    assert f[P + "lm_head.lora_A.weight"].shape == (5, 16)
    model = AutoModelForCausalLM.from_pretrained(family["base"])
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "ad").merge_and_unload().state_dict()
    ours = apply(tmp_path, family["base"], tmp_path / "ad")
    for name, t in ours.items():
        tol = 4 * 2.0**-23 * float(t.abs().max()) * 6  # peft's matmul order vs our rank order, r ≤ 5
        assert float((t - merged[name]).abs().max()) <= tol, name
    ft = builders.load_tensors(family["ft"])
    assert torch.equal(ours["model.norm.weight"], ft["model.norm.weight"])  # saved whole


def test_a_model_plus_adapter_can_be_the_finetune(tmp_path, family, capsys):
    """Extracting (base+adapter) − base at the adapter's rank gives back its delta."""
    code, text = extract(capsys, family["ft"], family["base"], tmp_path / "first", "--rank", "2")
    assert code == 0, text
    ft = f"{family['base']}+{tmp_path / 'first'}"
    code, text = extract(capsys, Path(ft), family["base"], tmp_path / "again", "--rank", "2")
    assert code == 0, text
    first, again = (
        apply(tmp_path, family["base"], tmp_path / "first", "one"),
        apply(tmp_path, family["base"], tmp_path / "again", "two"),
    )
    for name, t in first.items():
        assert float((t - again[name]).abs().max()) <= 1e-5 * max(1.0, float(t.abs().max())), name


def test_conv1d_models_extract_transposed_and_peft_agrees(tmp_path, gpt2_family, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = gpt2_family["base"]
    code, text = extract(capsys, gpt2_family["a"], base, tmp_path / "ad", "--rank", "4")
    assert code == 0, text
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    f = factors(tmp_path / "ad")
    assert f[P + "transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 16)  # [r, in]: Conv1D weight is [16, 48]
    assert f[P + "transformer.h.0.attn.c_attn.lora_B.weight"].shape == (48, 4)
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "ad")
    merged = merged.merge_and_unload().state_dict()
    ours = apply(tmp_path, base, tmp_path / "ad")
    for name, t in ours.items():
        assert float((t - merged[name]).abs().max()) <= 1e-5 * max(1.0, float(t.abs().max())), name


def test_biases_of_decomposed_modules_are_reported_as_dropped(tmp_path, qwen2_family, capsys):
    code, text = extract(capsys, qwen2_family["a"], qwen2_family["base"], tmp_path / "ad", "--rank", "4")
    assert code == 0, text
    e = report(tmp_path / "ad")["model.layers.0.self_attn.k_proj.bias"]
    assert e["kind"] == "dropped" and e["rel_error"] == 1.0 and e["delta_norm"] > 0
    assert "bias of a decomposed module" in e["why"]
    assert P + "model.layers.0.self_attn.k_proj.bias" not in factors(tmp_path / "ad")


def test_extraction_refusals(tmp_path, family, capsys):
    code, text = extract(capsys, family["ft"], family["base"], tmp_path / "a")
    assert code == 2 and "give --rank R" in text
    code, text = extract(capsys, family["ft"], family["base"], tmp_path / "a", "--rank", "4", "--max-ram", "450MB")
    assert code == 2
    assert "model.layers.0.mlp.gate_proj.weight [32, 16]: its SVD needs ~" in text and "raise --max-ram" in text
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()
    code, text = extract(capsys, Path(f"{family['ft']}+x+y"), family["base"], tmp_path / "a", "--rank", "4")
    assert code == 2 and "expected 'model+adapter'" in text
    (tmp_path / "c.partial").mkdir()
    (tmp_path / "c.partial" / "notes.txt").write_text("mine")
    code, text = extract(capsys, family["ft"], family["base"], tmp_path / "c", "--rank", "4")
    assert code == 2 and "c.partial exists and is not an unfinished adapter" in text
    assert (tmp_path / "c.partial" / "notes.txt").read_text() == "mine"
    (tmp_path / "exists").mkdir()
    code, text = extract(capsys, family["ft"], family["base"], tmp_path / "exists", "--rank", "4")
    assert code == 2 and "already exists; pass --overwrite" in text
    with pytest.raises(SystemExit) as exit_info:
        extract(capsys, family["ft"], family["base"], tmp_path / "b", "--rank", "4", "--energy", "1.5")
    assert exit_info.value.code == 2 and "--energy: must be in (0, 1] (got 1.5)" in capsys.readouterr().err


def test_vocabularies_of_different_sizes_are_refused(tmp_path, family, capsys):
    bigger = tmp_path / "bigger"
    shutil.copytree(family["ft"], bigger)
    t = builders.load_tensors(bigger)
    t["model.embed_tokens.weight"] = torch.cat([t["model.embed_tokens.weight"], torch.zeros(8, 16)])
    builders.write_safetensors_model(bigger, t, None)
    code, text = extract(capsys, bigger, family["base"], tmp_path / "a", "--rank", "4")
    assert code == 2
    assert "model.embed_tokens.weight: [72, 16] in the fine-tune but [64, 16] in the base" in text
    assert "an adapter cannot change the vocabulary size" in text
