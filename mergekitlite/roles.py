"""What a tensor is, from its name: the one place that knows how checkpoints name their parts.

* **Layer tensors** carry the layer index as their first all-digit path component:
  ``model.layers.3.mlp.up_proj.weight`` (Llama, Qwen2, Mistral), ``transformer.h.3.attn.c_attn.weight``
  (GPT-2, Qwen v1), ``gpt_neox.layers.3...`` (NeoX). MoE expert numbers come after it.
* **The token embedding** (ids → vectors) and **the output head** (vectors → logits) have one row per
  vocabulary entry; they decide the vocabulary rules (different vocabulary sizes, special-token rows).
* **Position embeddings** (GPT-2's ``wpe``) sit before the layers too, but have one row per position,
  not per token.

Names are matched on whole path components at the end of the name (``embed_tokens.weight`` matches
``model.embed_tokens.weight`` and ``language_model.model.embed_tokens.weight``), and only outside the layer
stack (``layers.0.attention.output.weight`` is no output head).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Protocol

# Input token embeddings: Llama/Qwen2/Mistral, GPT-2/Qwen v1, NeoX, BLOOM/BERT, Meta's original Llama/InternLM.
EMBEDDING_NAMES = (
    "embed_tokens.weight",
    "wte.weight",
    "embed_in.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
)
# Output heads (logits): most families, NeoX, Meta's original Llama.
HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
# Learned position embeddings: GPT-2, OPT, BERT-style.
POSITION_NAMES = ("wpe.weight", "embed_positions.weight", "position_embeddings.weight")

# The parts (mergekit's "modules") of multimodal and encoder-decoder checkpoints, by the name prefixes of
# their tensors across the families mergekit knows (LLaVA-style, Gemma 3, Llama 4, Mistral 3, Qwen2/2.5/3-VL,
# T5, Whisper). A tensor belongs to the module with the longest matching prefix. The layer-count keys say
# where config.json counts a module's layers.
MODULE_PREFIXES: dict[str, tuple[str, ...]] = {
    "text_decoder": (
        "language_model.",
        "model.language_model.",
        "model.layers.",
        "model.embed_tokens.",
        "model.norm.",
        "lm_head.",
    ),
    "vision_tower": ("vision_tower.", "visual.", "model.visual."),
    "vision_model": ("vision_model.",),
    "multi_modal_projector": (
        "multi_modal_projector.",
        "visual.merger.",
        "model.visual.merger.",
        "model.visual.deepstack_merger_list.",
    ),
    "encoder": ("encoder.", "model.encoder."),
    "decoder": ("decoder.", "model.decoder."),
    "shared": ("shared.",),
}
MODULE_LAYER_KEYS: dict[str, tuple[str, ...]] = {
    "text_decoder": ("text_config.num_hidden_layers", "num_hidden_layers"),
    "vision_tower": ("vision_config.num_hidden_layers", "vision_config.depth"),
    "vision_model": ("vision_config.num_hidden_layers",),
    "encoder": ("encoder_layers", "num_layers"),
    "decoder": ("decoder_layers", "num_decoder_layers"),
}

_LAYER_RE = re.compile(r"^(?P<prefix>(?:[^.]+\.)*?)(?P<idx>\d+)\.(?P<rest>.+)$")


class Role(Enum):
    EMBEDDING = "embedding"
    POSITION = "position"
    HEAD = "head"
    LAYER = "layer"
    OTHER = "other"  # outside the layers: final norm, embedding norms, ...


class _HasShape(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...


def split_layer(name: str) -> tuple[str, int, str] | None:
    """``model.layers.3.mlp.up.weight`` → ``("model.layers.", 3, "mlp.up.weight")``; None outside the layers."""
    m = _LAYER_RE.match(name)
    if not m:
        return None
    return m["prefix"], int(m["idx"]), m["rest"]


def _ends_with(name: str, endings: Iterable[str]) -> bool:
    return any(name == e or name.endswith("." + e) for e in endings)


def module_of(name: str, modules: Iterable[str]) -> str | None:
    """Which of ``modules`` (names of ``MODULE_PREFIXES``) the tensor belongs to: the longest matching prefix."""
    best = max(((len(p), m) for m in modules for p in MODULE_PREFIXES.get(m, ()) if name.startswith(p)), default=None)
    return None if best is None else best[1]


def role_of(name: str) -> Role:
    if split_layer(name) is not None:
        return Role.LAYER
    if _ends_with(name, EMBEDDING_NAMES):
        return Role.EMBEDDING
    if _ends_with(name, HEAD_NAMES):
        return Role.HEAD
    if _ends_with(name, POSITION_NAMES):
        return Role.POSITION
    return Role.OTHER


def is_vocab_tensor(name: str, shape: tuple[int, ...]) -> bool:
    """One row per vocabulary entry: the token embedding or the output head (2-D)."""
    return len(shape) == 2 and role_of(name) in (Role.EMBEDDING, Role.HEAD)


def before_layers(name: str) -> bool:
    """Whether a tensor outside the layers belongs before them in a checkpoint (embeddings of any kind
    and their norms), rather than after (final norm, output head)."""
    role = role_of(name)
    if role in (Role.EMBEDDING, Role.POSITION):
        return True
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]  # the module the parameter belongs to
    return role is Role.OTHER and "embed" in module


def find(
    tensors: Mapping[str, _HasShape], role: Role, *, rows: int | None = None, vocab_size: int | None = None
) -> str | None:
    """The name of the 2-D tensor of ``role`` (EMBEDDING or HEAD) among ``tensors`` (with ``rows`` rows when
    given). Multimodal checkpoints hold several (the text and vision towers' embeddings): the one with
    ``vocab_size`` rows wins, else the shortest name (the outermost module)."""
    found = [
        name
        for name, t in tensors.items()
        if len(t.shape) == 2 and role_of(name) is role and (rows is None or t.shape[0] == rows)
    ]
    if not found:
        return None
    return min(found, key=lambda n: (tensors[n].shape[0] != vocab_size, len(n)))
