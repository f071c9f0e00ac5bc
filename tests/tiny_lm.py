"""Tiny runnable language models with a real tokenizer, for the eval / inspect tests.

* ``make_tokenizer``: a character-level tokenizer (``tokenizers`` WordLevel, one token per character)
  with ChatML special tokens at ids 0..3, as the demo family and Qwen chat models have them.
* ``random_lm``: a seeded random Llama (float32), saved with tokenizer, chat template and generation
  config the way hub repositories look.
* ``bigram_lm``: a Llama whose greedy next token depends only on the current token and follows a
  transition table we choose: the attention and MLP outputs are zeroed, the embedding is the identity
  (hidden size = vocabulary size), so the final hidden state is the current token's one-hot direction
  and ``lm_head[j, i]`` is the logit of token ``j`` after token ``i``. Its generations (and so its
  EOS-termination rate) are known exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mergekitlite.tokens import builtin_chat_template

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

ENDOFTEXT, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIALS = (ENDOFTEXT, IM_START, IM_END, UNK)
CHATML = builtin_chat_template("chatml")
ALPHABET = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n"


def make_tokenizer(extra_chars: str = "") -> PreTrainedTokenizerFast:
    """Specials at ids 0..3, then printable ASCII and newline (and ``extra_chars``), one id per character."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in ALPHABET + extra_chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def save_lm(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    path: Path,
    *,
    eos: Sequence[str],
    chat_template: str | None,
) -> Path:
    """Weights, config, generation_config (eos = ``eos`` tokens) and tokenizer files; the chat template
    goes into tokenizer_config.json, where Qwen-era repositories keep it."""
    from transformers import GenerationConfig

    ids = [tokenizer.convert_tokens_to_ids(t) for t in eos]
    pad = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    model.generation_config = GenerationConfig(eos_token_id=ids if len(ids) > 1 else ids[0], pad_token_id=pad)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _llama(vocab: int, hidden: int, layers: int, heads: int, intermediate: int) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).float().eval()


def random_lm(
    path: Path,
    seed: int,
    tokenizer: PreTrainedTokenizerFast,
    *,
    like: Path | None = None,
    noise: float = 0.05,
    eos: Sequence[str] = (IM_END, ENDOFTEXT),
    chat_template: str | None = CHATML,
) -> Path:
    """A seeded random Llama; with ``like``, that model's weights plus seeded noise (a fine-tune-like relative)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = _llama(len(tokenizer), 32, 2, 4, 64)
    with torch.no_grad():
        if like is not None:
            model.load_state_dict(LlamaForCausalLM.from_pretrained(like, dtype=torch.float32).state_dict())
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
        else:
            for p in model.parameters():
                if p.dim() == 1:  # random init leaves the norms at exactly 1: make them distinct too
                    p.add_(torch.randn_like(p) * 0.1)
                else:  # init std 0.02 gives near-uniform next-token distributions: sharpen them
                    p.mul_(10.0)
    return save_lm(model, tokenizer, path, eos=eos, chat_template=chat_template)


def bigram_lm(
    path: Path,
    tokenizer: PreTrainedTokenizerFast,
    next_token: Callable[[int], int],
    *,
    eos: Sequence[str] = (IM_END, ENDOFTEXT),
    chat_template: str | None = CHATML,
) -> Path:
    """A Llama whose greedy continuation of token ``i`` is ``next_token(i)`` (see the module docstring)."""
    vocab = len(tokenizer)
    torch.manual_seed(0)
    model = _llama(vocab, vocab, 1, 1, 4)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()  # no attention output: the residual stream stays the embedding
        layer.mlp.down_proj.weight.zero_()  # no MLP output either
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(vocab, vocab)
        for i in range(vocab):
            head[next_token(i), i] = 1.0  # the final hidden state is ~sqrt(vocab) · e_i: logit ≈ 10 for next_token(i)
        model.lm_head.weight.copy_(head)
    return save_lm(model, tokenizer, path, eos=eos, chat_template=chat_template)
