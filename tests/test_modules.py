"""mergekit's ``modules:`` recipes: each part of a multimodal checkpoint (text decoder, vision tower, projector)
merged with its own models or slices and parameters. Every output tensor is compared with the value computed
here from the inputs."""

from __future__ import annotations

from pathlib import Path

import builders
import pytest
import torch
from builders import assert_bitwise, load_tensors, read_config

from mergekitlite import MergeOptions, run_merge
from mergekitlite.cli import merge_main

H, TEXT_LAYERS, VISION_LAYERS, VOCAB = 8, 3, 2, 16


def llava_like(path: Path, seed: int) -> Path:
    """A LLaVA-layout checkpoint: language_model.*, vision_tower.*, multi_modal_projector.*."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(torch.bfloat16)

    t = {
        "language_model.model.embed_tokens.weight": r(VOCAB, H),
        "language_model.model.norm.weight": r(H),
        "language_model.lm_head.weight": r(VOCAB, H),
        "vision_tower.vision_model.embeddings.patch_embedding.weight": r(H, 3),
        "vision_tower.vision_model.post_layernorm.weight": r(H),
        "multi_modal_projector.linear_1.weight": r(H, H),
    }
    for i in range(TEXT_LAYERS):
        t[f"language_model.model.layers.{i}.mlp.up_proj.weight"] = r(2 * H, H)
        t[f"language_model.model.layers.{i}.input_layernorm.weight"] = r(H)
    for i in range(VISION_LAYERS):
        t[f"vision_tower.vision_model.encoder.layers.{i}.mlp.fc1.weight"] = r(2 * H, H)
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": {"num_hidden_layers": TEXT_LAYERS, "hidden_size": H, "vocab_size": VOCAB},
        "vision_config": {"num_hidden_layers": VISION_LAYERS, "hidden_size": H},
    }
    return builders.write_safetensors_model(path, t, config)


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llava")
    return {name: llava_like(root / name, seed) for name, seed in (("base", 1), ("a", 2), ("b", 3))}


def test_each_module_merges_its_own_way(fam, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""
merge_method: linear
base_model: {fam["base"]}
modules:
  text_decoder:
    slices:
      - sources: [{{model: {fam["a"]}, layer_range: [0, 2]}}]
      - sources: [{{model: {fam["b"]}, layer_range: [1, 3]}}]
    parameters: {{weight: 1.0}}
  vision_tower:
    models:
      - model: {fam["a"]}
        parameters: {{weight: 3.0}}
      - model: {fam["b"]}
    parameters: {{weight: 1.0}}
  multi_modal_projector:
    models:
      - model: {fam["a"]}
      - model: {fam["b"]}
parameters:
  weight: 0.25
dtype: bfloat16
"""
    )
    result = run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False))
    got = load_tensors(tmp_path / "out")
    base, a, b = (load_tensors(fam[k]) for k in ("base", "a", "b"))

    def linear(name: str, wa: float, wb: float) -> torch.Tensor:
        total = a[name].float() * wa + b[name].float() * wb
        return (total / (wa + wb)).to(torch.bfloat16)

    # text decoder: a's layers 0-1 then b's layers 1-2, renumbered 0-3; outer text tensors from the first slice
    # (embeddings: a) and the last (norm, head: b), each a linear "merge" of one model
    text = {
        f"language_model.model.layers.{k}.{rest}": (m, src)
        for k, (m, src) in enumerate([("a", 0), ("a", 1), ("b", 1), ("b", 2)])
        for rest in ("mlp.up_proj.weight", "input_layernorm.weight")
    }
    for name, (m, src) in text.items():
        layer = name.split(".")[3]
        assert_bitwise(got[name], {"a": a, "b": b}[m][name.replace(f"layers.{layer}.", f"layers.{src}.")], name)
    assert_bitwise(got["language_model.model.embed_tokens.weight"], a["language_model.model.embed_tokens.weight"])
    assert_bitwise(got["language_model.lm_head.weight"], b["language_model.lm_head.weight"])
    # vision tower: the model's weight (3.0) over the module's (1.0); projector: the recipe's global weight
    for name in base:
        if name.startswith("vision_tower."):
            assert_bitwise(got[name], linear(name, 3.0, 1.0), name)
        elif name.startswith("multi_modal_projector."):
            assert_bitwise(got[name], linear(name, 0.25, 0.25), name)
    assert len(got) == len(base) + 2  # four text layers of two tensors instead of three
    cfg = read_config(tmp_path / "out")
    assert cfg["text_config"]["num_hidden_layers"] == 4
    assert cfg["vision_config"]["num_hidden_layers"] == VISION_LAYERS
    assert result.plan.recipe.modules is not None


def test_a_tensor_in_no_listed_module_is_a_plan_error(fam, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodules:\n  text_decoder:\n    models:\n      - model: {fam['a']}\n"
        f"      - model: {fam['b']}\nparameters: {{weight: 0.5}}\n"
    )
    assert merge_main([str(recipe), str(tmp_path / "out"), "--no-hash"]) == 2
    err = capsys.readouterr().err
    assert "'multi_modal_projector.linear_1.weight' belongs to none of the recipe's modules (text_decoder)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_an_unknown_module_name_is_a_plan_error(fam, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodules:\n  audio_tower:\n    models:\n      - model: {fam['a']}\n"
        "parameters: {weight: 1.0}\n"
    )
    assert merge_main([str(recipe), str(tmp_path / "out"), "--no-hash"]) == 2
    err = capsys.readouterr().err
    assert "modules.audio_tower: not a module mergekitlite knows; known: text_decoder, vision_tower" in err
