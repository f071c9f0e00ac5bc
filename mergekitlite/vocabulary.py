"""Token vocabularies of the input models and the output's tokenizer, as mergekit defines them.

With ``tokenizer_source`` (or a ``tokenizer:`` block) a recipe says which vocabulary the output has:

* a model's (or ``base``): that model's tokenizer, plus the tokens ``tokenizer.tokens`` names that it lacks;
* ``union``: the base model's tokenizer (else the first model's) plus every token of the other models'
  vocabularies it lacks (ordinary tokens first, in model order, then added/special tokens), as mergekit's
  ``build_union_tokenizer`` makes it.

Each input's embedding and output-head rows are then found by token text, not by id (see
``plan/vocab.py``). Tokens whose id is at or past a model's ``vocab_size`` are not part of its vocabulary
(padding rows). Tokenizers are read with transformers' fast tokenizers and never run model code: a model
whose tokenizer needs ``trust_remote_code`` cannot take part in a vocabulary merge (identical tokenizers
need no reading at all).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekitlite.errors import CheckpointError, one_line

# Files whose bytes decide a tokenizer's vocabulary: equal files mean equal vocabularies.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json")


@dataclass(frozen=True)
class Vocab:
    """A model's vocabulary: token text → row, for rows below its embedding's row count."""

    tokens: Mapping[str, int]
    added: tuple[Any, ...] = ()  # transformers AddedToken objects, in id order (for the union)


def has_vocabulary_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in VOCAB_FILES) or any(folder.glob("*.tiktoken"))


def same_tokenizer_files(folders: Sequence[Path]) -> bool:
    """Whether every folder holds byte-identical vocabulary files (then the vocabularies are the same)."""

    def signature(folder: Path) -> tuple[tuple[str, bytes], ...]:
        out = []
        for p in [*(folder / name for name in VOCAB_FILES), *sorted(folder.glob("*.tiktoken"))]:
            if p.is_file():
                out.append((p.name, p.read_bytes()))
        cfg = _json(folder / "tokenizer_config.json").get("added_tokens_decoder")
        out.append(("added_tokens_decoder", json.dumps(cfg, sort_keys=True).encode()))
        return tuple(out)

    first = signature(folders[0])
    return bool(first[:-1]) and all(signature(f) == first for f in folders[1:])


def tokens_from_files(folder: Path) -> list[str] | None:
    """The vocabulary by id from ``tokenizer.json`` alone (the ``tokenizers`` library: no transformers, no
    torch), or None when the folder has none or it cannot be read."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception:  # a tokenizer.json the library cannot read: leave it to transformers
        return None
    tokens = [""] * (max(vocab.values(), default=-1) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    return tokens


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_tokenizer(folder: Path, model: str) -> Any:
    """The fast tokenizer of ``folder`` (no remote code); CheckpointError naming the model when it cannot be read."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds: OSError, ValueError, ImportError...
        first = one_line(exc, 200)
        raise CheckpointError(
            f"model {model!r}: its tokenizer cannot be read without running model code ({first[:200]}); "
            "a merge that maps tokens between vocabularies needs a fast tokenizer (tokenizer.json)"
        ) from None


def vocab_of(tokenizer: Any, rows: int | None) -> Vocab:
    """The tokenizer's vocabulary limited to ``rows`` embedding rows (None: all)."""
    tokens = {t: i for t, i in tokenizer.get_vocab().items() if rows is None or i < rows}
    added = tuple(info for i, info in sorted(tokenizer.added_tokens_decoder.items()) if rows is None or i < rows)
    return Vocab(tokens, added)


def build_output_tokenizer(
    choice: str,
    base: Any,
    others: Sequence[tuple[Any, int | None]],
    add_tokens: Sequence[str],
) -> Any:
    """The output's tokenizer: ``base`` (the tokenizer source's; for ``union`` the base model's) with, for
    ``union``, every token of ``others`` (tokenizer, rows) it lacks, then ``add_tokens``. Ordinary tokens are
    added before added/special ones, each in first-seen order, as mergekit does. ``base`` itself when nothing
    is added (it is never changed: additions go to a copy)."""
    have = set(base.get_vocab())
    plain: dict[str, None] = {}
    special: dict[str, Any] = {}
    if choice == "union":
        for tok, rows in [(base, None), *others]:
            vocab = vocab_of(tok, rows)
            added_texts = {a.content for a in vocab.added}
            for text in sorted(vocab.tokens, key=vocab.tokens.__getitem__):
                if text not in added_texts and text not in have:
                    plain.setdefault(text, None)
            for info in vocab.added:
                if info.content not in have and info.content not in plain:
                    special.setdefault(info.content, info)
    extra = [t for t in add_tokens if t not in have and t not in plain and t not in special]
    if not (plain or special or extra):
        return base
    out = _copy(base)
    for batch in (list(plain), list(special.values()), extra):
        if batch:
            out.add_tokens(batch)
    return out


def _copy(tokenizer: Any) -> Any:
    """An independent copy (saving and reloading, as mergekit does, so that the input is never changed)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=False)
