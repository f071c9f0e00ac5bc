"""Tensor roles from names: the one table every module asks (planner, row rules, inspect, diff)."""

from __future__ import annotations

import pytest

from mergekitlite.roles import Role, before_layers, find, is_vocab_tensor, role_of, split_layer


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("model.embed_tokens.weight", Role.EMBEDDING),
        ("language_model.model.embed_tokens.weight", Role.EMBEDDING),
        ("transformer.wte.weight", Role.EMBEDDING),
        ("gpt_neox.embed_in.weight", Role.EMBEDDING),
        ("transformer.word_embeddings.weight", Role.EMBEDDING),
        ("tok_embeddings.weight", Role.EMBEDDING),
        ("lm_head.weight", Role.HEAD),
        ("embed_out.weight", Role.HEAD),
        ("output.weight", Role.HEAD),
        ("transformer.wpe.weight", Role.POSITION),
        ("model.decoder.embed_positions.weight", Role.POSITION),
        ("model.norm.weight", Role.OTHER),
        ("transformer.ln_f.bias", Role.OTHER),
        ("model.layers.3.mlp.up_proj.weight", Role.LAYER),
        # inside a layer an "output.weight" is no output head
        ("model.layers.0.attention.output.weight", Role.LAYER),
        # a suffix must be whole path components
        ("model.my_lm_head.weight", Role.OTHER),
    ],
)
def test_role_of(name: str, role: Role) -> None:
    assert role_of(name) is role


def test_split_layer_takes_the_first_number() -> None:
    assert split_layer("model.layers.3.mlp.experts.7.w1.weight") == ("model.layers.", 3, "mlp.experts.7.w1.weight")
    assert split_layer("transformer.h.11.attn.c_attn.weight") == ("transformer.h.", 11, "attn.c_attn.weight")
    assert split_layer("model.norm.weight") is None


def test_vocab_tensors_are_2d_embeddings_and_heads() -> None:
    assert is_vocab_tensor("model.embed_tokens.weight", (100, 8))
    assert is_vocab_tensor("lm_head.weight", (100, 8))
    assert not is_vocab_tensor("transformer.wpe.weight", (64, 8))  # one row per position, not per token
    assert not is_vocab_tensor("lm_head.bias", (100,))
    assert not is_vocab_tensor("model.norm.weight", (8,))


def test_before_layers() -> None:
    assert before_layers("model.embed_tokens.weight")
    assert before_layers("transformer.wpe.weight")
    assert before_layers("transformer.word_embeddings_layernorm.weight")
    assert not before_layers("lm_head.weight")
    assert not before_layers("embed_out.weight")  # NeoX's output head
    assert not before_layers("model.norm.weight")


class _T:
    def __init__(self, *shape: int) -> None:
        self.shape = shape


def test_find_prefers_the_vocabulary_sized_matrix_then_the_shortest_name() -> None:
    tensors = {
        "vision_tower.embeddings.word_embeddings.weight": _T(50, 8),
        "language_model.model.embed_tokens.weight": _T(100, 8),
        "model.layers.0.mlp.up_proj.weight": _T(100, 8),
    }
    assert find(tensors, Role.EMBEDDING, vocab_size=100) == "language_model.model.embed_tokens.weight"
    assert find(tensors, Role.EMBEDDING, vocab_size=50) == "vision_tower.embeddings.word_embeddings.weight"
    assert find(tensors, Role.EMBEDDING) == "language_model.model.embed_tokens.weight"  # shorter
    assert find(tensors, Role.HEAD) is None
    assert find(tensors, Role.EMBEDDING, rows=7) is None
