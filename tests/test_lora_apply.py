"""``model+adapter`` inputs: PEFT LoRA adapters applied while streaming. Every LoRA'd tensor is compared with an
independent numpy reference (W + s·B·A summed over the rank in a fixed order, float32: bitwise) and with the
exact float64 value; peft's own adapters and merge are the cross-check of the layout."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import builders
import numpy as np
import pytest
import torch
from lora_helpers import assert_near_exact, f32, lora_pair, lora_reference, lora_reference64, peft_config, write_adapter

from mergekitlite.api import plan_merge, run_merge
from mergekitlite.cli import merge_main
from mergekitlite.options import MergeOptions

L0 = "model.layers.0."


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """An untied bf16 Llama (hidden 16, intermediate 32, vocab 64, 3 layers)."""
    return builders.make_llama(tmp_path_factory.mktemp("lora-llama") / "base", seed=11)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, llama) -> tuple[Path, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """q_proj and down_proj of every layer, v_proj of layer 1: r = 4, alpha = 8 (s = 2), float32 factors."""
    gen = torch.Generator().manual_seed(5)
    w = builders.load_tensors(llama)
    tensors, pairs = {}, {}
    for layer in range(3):
        for module in ["self_attn.q_proj", "mlp.down_proj"] + (["self_attn.v_proj"] if layer == 1 else []):
            m = f"model.layers.{layer}.{module}"
            rows, cols = w[m + ".weight"].shape
            a, b = lora_pair(gen, rows, cols, 4)
            tensors[m + ".lora_A.weight"], tensors[m + ".lora_B.weight"] = a, b
            pairs[m + ".weight"] = (a, b)
    return write_adapter(tmp_path_factory.mktemp("lora-ad") / "ad", peft_config(), tensors), pairs


def merge(tmp_path: Path, recipe: str, out: str = "out", *args: str) -> tuple[int, Path]:
    r = tmp_path / f"{out}.yaml"
    r.write_text(recipe)
    code = merge_main([str(r), str(tmp_path / out), "-q", *args])
    return code, tmp_path / out


def passthrough(model: str, dtype: str | None = "float32") -> str:
    return f"merge_method: passthrough\nmodels:\n  - model: {model}\n" + (f"dtype: {dtype}\n" if dtype else "")


def test_lora_tensors_are_w_plus_s_ba_bitwise_and_others_unchanged(tmp_path, llama, adapter):
    path, pairs = adapter
    code, out = merge(tmp_path, passthrough(f"{llama}+{path}"))
    assert code == 0
    got = builders.load_tensors(out)
    base = builders.load_tensors(llama)
    assert set(got) == set(base)
    for name, w in base.items():
        if name in pairs:
            a, b = pairs[name]
            ref = lora_reference(f32(w), [(f32(a), f32(b), 2.0, False)])
            assert np.array_equal(got[name].numpy(), ref), name
            assert_near_exact(got[name].numpy(), f32(w), [(f32(a), f32(b), 2.0, False)])
            assert not np.array_equal(got[name].numpy(), f32(w)), name  # the LoRA did something
        else:
            assert torch.equal(got[name], w.float()), name


def test_bf16_output_is_the_float32_value_rounded_once(tmp_path, llama, adapter):
    path, pairs = adapter
    code, out = merge(tmp_path, passthrough(f"{llama}+{path}", "bfloat16"))
    assert code == 0
    got = builders.load_tensors(out)
    for name, (a, b) in pairs.items():
        w = builders.load_tensors(llama)[name]
        ref = torch.from_numpy(lora_reference(f32(w), [(f32(a), f32(b), 2.0, False)])).to(torch.bfloat16)
        assert torch.equal(got[name], ref), name


def test_without_a_recipe_dtype_the_model_dtype_is_kept(tmp_path, llama, adapter):
    path, pairs = adapter
    code, out = merge(tmp_path, passthrough(f"{llama}+{path}", None))
    assert code == 0
    got = builders.load_tensors(out)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    name = next(iter(pairs))
    a, b = pairs[name]
    w = builders.load_tensors(llama)[name]
    assert torch.equal(got[name], torch.from_numpy(lora_reference(f32(w), [(f32(a), f32(b), 2.0, False)])).bfloat16())


def test_the_result_does_not_depend_on_the_chunking(tmp_path, llama, adapter):
    path, _ = adapter
    recipe = tmp_path / "r.yaml"
    recipe.write_text(passthrough(f"{llama}+{path}"))
    small = MergeOptions(max_ram=400 * 1000**2 + 8000, threads=2)
    plan = plan_merge(recipe, small)
    lora_tasks = [t for t in plan.tasks if "q_proj" in t.name or "down_proj" in t.name]
    assert lora_tasks and all(t.chunk_rows < t.rows for t in lora_tasks), [(t.name, t.chunk_rows) for t in lora_tasks]
    run_merge(recipe, tmp_path / "small", small)
    run_merge(recipe, tmp_path / "whole", MergeOptions(threads=2))
    a, b = builders.load_tensors(tmp_path / "small"), builders.load_tensors(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_planner_counts_the_lora_working_space(tmp_path, llama, adapter):
    path, _ = adapter
    recipe = tmp_path / "r.yaml"
    recipe.write_text(passthrough(f"{llama}+{path}"))
    plan = plan_merge(recipe, MergeOptions(threads=2))
    task = next(t for t in plan.tasks if t.name == L0 + "mlp.down_proj.weight")  # W [16, 32], bf16; A [4, 32] f32
    cost = task.row_cost(plan.compute_dtype, False)
    # per row: W as stored (32 × 2), accumulator and product (2 × 32 × 4), B's row (4 × (4 + 4))
    assert cost.produced == 32 * 2 + 2 * 32 * 4 + 4 * 8
    assert cost.fixed == 4 * 32 * 4 * 2  # A in float32 and as stored (float32)
    host, _ = plan.task_working_set(task)
    assert host == plan.budget.inflight * (cost.host * task.chunk_rows + cost.fixed)
    plain = plan_merge(_write(tmp_path / "p.yaml", passthrough(str(llama))), MergeOptions(threads=2))
    same = next(t for t in plain.tasks if t.name == task.name)
    assert plan.task_working_set(task)[0] > plain.task_working_set(same)[0]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_peft_made_adapter_merges_as_peft_merges_it(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = builders.make_llama(tmp_path / "base", seed=3, dtype=torch.float32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "up_proj", "embed_tokens", "lm_head"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 2},
        alpha_pattern={"up_proj": 3},
        modules_to_save=["model.norm"],
        init_lora_weights=False,  # B ≠ 0: the adapter changes the model
    )
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        pm.base_model.model.model.norm.modules_to_save["default"].weight.add_(0.25)
    pm.save_pretrained(tmp_path / "ad")
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    code, out = merge(tmp_path, passthrough(f"{base}+{tmp_path / 'ad'}"))
    assert code == 0
    got = builders.load_tensors(out)
    original = builders.load_tensors(base)
    changed = [k for k in got if not torch.equal(got[k], original[k])]
    assert {L0 + "self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(
        changed
    )
    for k in got:  # peft sums B @ A in BLAS order: equal to float32 rounding of the largest values
        tol = 4 * 2.0**-23 * float(merged[k].abs().max())
        assert (got[k] - merged[k]).abs().max() <= tol, (k, (got[k] - merged[k]).abs().max(), tol)


def test_peft_variants_scale_as_peft_does(tmp_path, llama):
    """rslora (α/√r), rank_pattern + alpha_pattern, an embedding LoRA and Conv1D (fan_in_fan_out) weights."""
    gen = torch.Generator().manual_seed(9)
    w = builders.load_tensors(llama)
    q, emb = L0 + "self_attn.q_proj", "model.embed_tokens"
    a_q, b_q = lora_pair(gen, 16, 16, 2)
    a_e, b_e = lora_pair(gen, 16, 64, 4)  # lora_embedding_A [r, vocab], lora_embedding_B [hidden, r]
    cfg = peft_config(
        target_modules=["q_proj", "embed_tokens"],
        use_rslora=True,
        lora_alpha=3,
        rank_pattern={"model.layers.0.self_attn.q_proj": 2},
        alpha_pattern={"q_proj": 5},
    )
    tensors = {
        q + ".lora_A.weight": a_q,
        q + ".lora_B.weight": b_q,
        emb + ".lora_embedding_A": a_e,
        emb + ".lora_embedding_B": b_e,
    }
    ad = write_adapter(tmp_path / "ad", cfg, tensors, bin=True)
    code, out = merge(tmp_path, passthrough(f"{llama}+{ad}"))
    assert code == 0
    got = builders.load_tensors(out)
    ref_q = lora_reference(f32(w[q + ".weight"]), [(f32(a_q), f32(b_q), 5 / math.sqrt(2), False)])
    ref_e = lora_reference(f32(w[emb + ".weight"]), [(f32(a_e), f32(b_e), 3 / math.sqrt(4), True)])
    assert np.array_equal(got[q + ".weight"].numpy(), ref_q)
    assert np.array_equal(got[emb + ".weight"].numpy(), ref_e)


def test_conv1d_weights_take_the_transposed_product(tmp_path, gpt2_family):
    base = gpt2_family["base"]
    w = builders.load_tensors(base)
    gen = torch.Generator().manual_seed(4)
    m = "transformer.h.1.attn.c_attn"  # Conv1D: weight [in 16, out 48]
    a, b = lora_pair(gen, 48, 16, 4)  # A [r, in], B [out, r]
    sq = "transformer.h.0.attn.c_proj"  # square [16, 16]: the module type decides (Conv1D → transposed)
    a2, b2 = lora_pair(gen, 16, 16, 4)
    tensors = {m + ".lora_A.weight": a, m + ".lora_B.weight": b, sq + ".lora_A.weight": a2, sq + ".lora_B.weight": b2}
    ad = write_adapter(tmp_path / "ad", peft_config(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True), tensors)
    code, out = merge(tmp_path, passthrough(f"{base}+{ad}"))
    assert code == 0
    got = builders.load_tensors(out)
    for name, (aa, bb) in {m: (a, b), sq: (a2, b2)}.items():
        ref = lora_reference(f32(w[name + ".weight"]), [(f32(aa), f32(bb), 2.0, True)])
        assert np.array_equal(got[name + ".weight"].numpy(), ref), name


def test_a_tied_head_lora_and_embedding_lora_both_change_the_shared_weight(tmp_path, llama_tied_family):
    base = llama_tied_family["base"]
    w = builders.load_tensors(base)
    assert "lm_head.weight" not in w
    gen = torch.Generator().manual_seed(2)
    a_h, b_h = lora_pair(gen, 64, 16, 4)  # lm_head: Linear [vocab, hidden]
    a_e, b_e = torch.randn(4, 64, generator=gen), torch.randn(16, 4, generator=gen)
    tensors = {
        "lm_head.lora_A.weight": a_h,
        "lm_head.lora_B.weight": b_h,
        "model.embed_tokens.lora_embedding_A": a_e,
        "model.embed_tokens.lora_embedding_B": b_e,
    }
    ad = write_adapter(tmp_path / "ad", peft_config(target_modules=["lm_head", "embed_tokens"]), tensors)
    code, out = merge(tmp_path, passthrough(f"{base}+{ad}"))
    assert code == 0
    got = builders.load_tensors(out)
    assert "lm_head.weight" not in got
    # The weight's own module first (peft merges the embedding before the head), then the tied head's LoRA.
    ref = lora_reference(
        f32(w["model.embed_tokens.weight"]), [(f32(a_e), f32(b_e), 2.0, True), (f32(a_h), f32(b_h), 2.0, False)]
    )
    assert np.array_equal(got["model.embed_tokens.weight"].numpy(), ref)


def test_saved_modules_base_layers_and_lora_bias(tmp_path, qwen2_family):
    base = qwen2_family["base"]
    w = builders.load_tensors(base)
    gen = torch.Generator().manual_seed(8)
    k = "model.layers.1.self_attn.k_proj"  # [8, 16] with a bias [8]
    a, b = lora_pair(gen, 8, 16, 4)
    lb = torch.randn(8, generator=gen)
    head = torch.randn(64, 16, generator=gen).to(torch.bfloat16)
    emb_base = torch.randn(64, 16, generator=gen)
    a_e, b_e = torch.randn(4, 64, generator=gen), torch.randn(16, 4, generator=gen)
    tensors = {
        k + ".lora_A.weight": a,
        k + ".lora_B.weight": b,
        k + ".lora_B.bias": lb,
        "lm_head.weight": head,
        "model.embed_tokens.base_layer.weight": emb_base,
        "model.embed_tokens.lora_embedding_A": a_e,
        "model.embed_tokens.lora_embedding_B": b_e,
    }
    cfg = peft_config(target_modules=["k_proj", "embed_tokens"], modules_to_save=["lm_head"], lora_bias=True)
    ad = write_adapter(tmp_path / "ad", cfg, tensors)
    code, out = merge(tmp_path, passthrough(f"{base}+{ad}"))
    assert code == 0
    got = builders.load_tensors(out)
    assert np.array_equal(
        got[k + ".weight"].numpy(), lora_reference(f32(w[k + ".weight"]), [(f32(a), f32(b), 2.0, False)])
    )
    assert np.array_equal(got[k + ".bias"].numpy(), f32(w[k + ".bias"]) + f32(lb) * np.float32(2.0))
    assert torch.equal(got["lm_head.weight"], head.float())
    ref_e = lora_reference(f32(emb_base), [(f32(a_e), f32(b_e), 2.0, True)])
    assert np.array_equal(got["model.embed_tokens.weight"].numpy(), ref_e)


def test_lora_inputs_in_task_arithmetic_and_slices(tmp_path, llama, adapter):
    """base + 0.5·((base+adapter) − base): half the LoRA delta; and a slice of the adapted model."""
    path, pairs = adapter
    recipe = (
        f"merge_method: task_arithmetic\nbase_model: {llama}\nmodels:\n"
        f"  - model: {llama}+{path}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    )
    code, out = merge(tmp_path, recipe)
    assert code == 0
    got = builders.load_tensors(out)
    for name, (a, b) in pairs.items():
        w = f32(builders.load_tensors(llama)[name])
        exact = w + 0.5 * (lora_reference64(w, [(f32(a), f32(b), 2.0, False)]) - w)
        assert np.abs(got[name].numpy() - exact).max() <= 8 * np.spacing(np.float32(np.abs(exact).max())), name
    sliced = (
        "merge_method: passthrough\nslices:\n  - sources:\n"
        f"      - model: {llama}+{path}\n        layer_range: [1, 2]\ndtype: float32\n"
    )
    code, out = merge(tmp_path, sliced, "sliced")
    assert code == 0
    got = builders.load_tensors(out)
    a, b = pairs["model.layers.1.self_attn.v_proj.weight"]
    w = builders.load_tensors(llama)["model.layers.1.self_attn.v_proj.weight"]
    ref = lora_reference(f32(w), [(f32(a), f32(b), 2.0, False)])
    assert np.array_equal(got["model.layers.0.self_attn.v_proj.weight"].numpy(), ref)


def test_the_card_records_the_adapter_and_its_hashes(tmp_path, llama, adapter):
    path, _ = adapter
    r = tmp_path / "r.yaml"
    r.write_text(passthrough(f"{llama}+{path}"))
    assert merge_main([str(r), str(tmp_path / "out"), "-q"]) == 0
    prov = json.loads((tmp_path / "out" / "mergekitlite.json").read_text())
    entry = prov["inputs"][f"{llama}+{path}"]
    assert entry["adapter"] == str(path.resolve())
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert entry["files"][f"+adapter/{name}"] == hashlib.sha256((path / name).read_bytes()).hexdigest()
    assert "+adapter/adapter_model.safetensors" in (tmp_path / "out" / "README.md").read_text()


def test_the_plan_fingerprint_follows_the_adapter_config(tmp_path, llama, adapter):
    _, pairs = adapter
    r = _write(tmp_path / "r.yaml", passthrough(f"{llama}+{tmp_path / 'ad'}"))
    tensors = {}
    for name, (a, b) in pairs.items():
        m = name.removesuffix(".weight")
        tensors[m + ".lora_A.weight"], tensors[m + ".lora_B.weight"] = a, b
    write_adapter(tmp_path / "ad", peft_config(), tensors)
    first = plan_merge(r, MergeOptions(threads=2)).fingerprint()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(peft_config(lora_alpha=16)))
    assert plan_merge(r, MergeOptions(threads=2)).fingerprint() != first


def test_mergekit_lora_flags_are_accepted_with_a_note(tmp_path, llama, adapter, capsys):
    path, _ = adapter
    r = _write(tmp_path / "r.yaml", passthrough(f"{llama}+{path}"))
    code = merge_main(
        [str(r), str(tmp_path / "out"), "--lora-merge-cache", str(tmp_path / "c"), "--lora-merge-dtype", "bfloat16"]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "--lora-merge-cache has no effect: model+adapter inputs are applied while streaming" in text
    assert "--lora-merge-dtype has no effect" in text
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- refusals: exit 2, adapter and setting named
def _adapter_with(tmp_path: Path, llama: Path, **config) -> Path:
    gen = torch.Generator().manual_seed(1)
    a, b = lora_pair(gen, 16, 16, 4)
    tensors = {L0 + "self_attn.q_proj.lora_A.weight": a, L0 + "self_attn.q_proj.lora_B.weight": b}
    return write_adapter(tmp_path / "bad", peft_config(**config), tensors)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "use_dora: true is not supported (DoRA"),
        ({"peft_type": "IA3"}, "peft_type: 'IA3' is not supported"),
        ({"peft_type": "LOHA"}, "peft_type: 'LOHA' is not supported"),
        ({"bias": "all"}, "bias: 'all' is not supported"),
        ({"layer_replication": [[0, 2]]}, "layer_replication: [[0, 2]] is not supported"),
        ({"target_modules": ["k_proj"]}, "model.layers.0.self_attn.q_proj: the adapter has LoRA weights for it but"),
        ({"layers_to_transform": [1]}, "do not select it"),
        ({"r": 8}, "rank 8 (r / rank_pattern) but W [16, 16], A [4, 16], B [16, 4]"),
    ],
)
def test_unsupported_adapters_are_refused_naming_the_setting(tmp_path, llama, capsys, config, message):
    bad = _adapter_with(tmp_path, llama, **config)
    code, out = merge(tmp_path, passthrough(f"{llama}+{bad}"))
    text = capsys.readouterr().err
    assert code == 2
    assert message in text, text
    assert str(bad) in text or repr(str(bad)) in text, text
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_an_adapter_for_another_model_names_the_tensor(tmp_path, llama, capsys):
    gen = torch.Generator().manual_seed(1)
    a, b = lora_pair(gen, 24, 16, 4)  # q_proj is [16, 16] in this model
    tensors = {L0 + "self_attn.q_proj.lora_A.weight": a, L0 + "self_attn.q_proj.lora_B.weight": b}
    bad = write_adapter(
        tmp_path / "other",
        peft_config(),
        tensors | {"model.layers.7.mlp.down_proj.lora_A.weight": a, "model.layers.7.mlp.down_proj.lora_B.weight": b},
    )
    code, _ = merge(tmp_path, passthrough(f"{llama}+{bad}"))
    text = capsys.readouterr().err
    assert code == 2
    assert (
        "model.layers.0.self_attn.q_proj: the LoRA does not fit the weight model.layers.0.self_attn.q_proj.weight"
        in text
    )
    assert "model.layers.7.mlp.down_proj: the model has no tensor 'model.layers.7.mlp.down_proj.weight'" in text


def test_dora_tensors_and_unapplied_biases_are_refused(tmp_path, llama, capsys):
    gen = torch.Generator().manual_seed(1)
    a, b = lora_pair(gen, 16, 16, 4)
    q = L0 + "self_attn.q_proj"
    bad = write_adapter(
        tmp_path / "dora",
        peft_config(),
        {q + ".lora_A.weight": a, q + ".lora_B.weight": b, q + ".lora_magnitude_vector": torch.ones(16)},
    )
    assert merge(tmp_path, passthrough(f"{llama}+{bad}"))[0] == 2
    assert "lora_magnitude_vector: DoRA magnitudes" in capsys.readouterr().err
    bias = write_adapter(
        tmp_path / "bias",
        peft_config(),
        {q + ".lora_A.weight": a, q + ".lora_B.weight": b, q + ".lora_B.bias": torch.ones(16)},
    )
    assert merge(tmp_path, passthrough(f"{llama}+{bias}"), "o2")[0] == 2
    assert "lora_B.bias: adapter_config.json does not set lora_bias: true" in capsys.readouterr().err


def test_a_missing_adapter_or_a_model_after_the_plus_is_explained(tmp_path, llama, capsys):
    assert merge(tmp_path, passthrough(f"{llama}+{tmp_path / 'nope'}"))[0] == 2
    assert f"adapter '{tmp_path / 'nope'}': no such folder" in capsys.readouterr().err
    assert merge(tmp_path, passthrough(f"{llama}+{llama}"), "o2")[0] == 2
    assert "no adapter_config.json (it looks like a full model" in capsys.readouterr().err


def test_reading_a_chunk_uses_no_more_than_the_planner_counts(tmp_path, llama, adapter):
    """The buffers lora.rows asks for while producing a chunk, against AdaptedTensor's declared working space."""
    from mergekitlite.io.files import InputFiles
    from mergekitlite.lora.rows import read_rows
    from mergekitlite.lora.source import open_adapted

    path, _ = adapter
    src = open_adapted(f"{llama}+{path}", None)

    class Recording:
        def __init__(self) -> None:
            self.bytes: dict[str, int] = {}

        def get(self, slot, index, numel, dtype, device):
            size = numel * torch.empty(0, dtype=dtype).element_size()
            self.bytes[slot] = max(self.bytes.get(slot, 0), size)
            return torch.empty(numel, dtype=dtype)

    for name in (L0 + "mlp.down_proj.weight", L0 + "self_attn.q_proj.weight"):
        info = src.tensors[name]
        rows = 5
        bufs = Recording()
        dst = torch.empty(rows * info.row_bytes, dtype=torch.uint8)
        with InputFiles() as files:
            read_rows(files, info, 3, rows, memoryview(dst.numpy()), bufs)
        assert sum(bufs.bytes.values()) <= info.extra_row_bytes() * rows + info.fixed_bytes(), (name, bufs.bytes)
