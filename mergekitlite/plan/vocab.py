"""The output's vocabulary and, per model, which of its embedding rows each output token reads — mergekit's
rules, which apply whenever a recipe names a tokenizer (``tokenizer_source`` or a ``tokenizer:`` block):

* the output has the tokenizer source's vocabulary (``union``: the union of all; see ``vocabulary.py``), plus
  tokens named in ``tokenizer.tokens``, padded to ``pad_to_multiple_of`` rows;
* every input's embedding and output head are re-indexed by token text into that vocabulary before the
  merge; a model that lacks a token gets, in place of its own row, a default: the row of the one model
  that has it, else the base model's, else the mean of the models that have it, else zero;
* ``tokenizer.tokens`` sets that default for one token (a model's row of it, another token's row, or zero);
  with ``force: true`` every model takes it, even those that have the token;
* padding rows are each input's mean row.

A recipe that sets ``vocab_policy`` (a mergekitlite extension) keeps the positional rules of
``rowrules.vocab_layout`` instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mergekitlite.errors import CheckpointError
from mergekitlite.plan.inputs import lookup_tensor, tokenizer_choice
from mergekitlite.plan.problems import Problems
from mergekitlite.recipe import Recipe, TokenizerConfig, TokenSource, TokenSpec
from mergekitlite.roles import Role, find
from mergekitlite.sources import ModelSource
from mergekitlite.taskgraph import InputRef, RowSource


@dataclass(frozen=True)
class OutputVocab:
    source: str  # the recipe's choice: "union", "base" or a model
    donor: str  # the model whose tokenizer the output's is made from
    tokens: tuple[str, ...]  # the output vocabulary, by id
    rows: int  # embedding rows of the output (padded)
    perms: Mapping[str, Any]  # model → numpy int64 [len(tokens)]: its row of each output token, −1 if none
    configs: Mapping[int, tuple[str, TokenSpec]]  # tokenizer.tokens by output id: (key as written, setting)
    rebuilt: bool  # the output tokenizer is not a copy of the donor's files
    add_tokens: tuple[str, ...]
    tokenizer: Any = field(default=None, compare=False, repr=False)  # the rebuilt one (transformers), to save

    @property
    def ids(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


def embedding_rows(src: ModelSource) -> int | None:
    """Rows of the model's token embedding (its vocabulary size as the weights see it)."""
    name = find(src.tensors, Role.EMBEDDING, vocab_size=src.config_value("vocab_size"))
    if name is not None:
        return src.tensors[name].shape[0]
    value = src.config_value("vocab_size")
    return value if isinstance(value, int) else None


def output_vocab(
    recipe: Recipe, sources: Mapping[str, ModelSource], merged: Sequence[str], config_donor: str, problems: Problems
) -> tuple[OutputVocab | None, list[str]]:
    """The output vocabulary when the recipe names a tokenizer (None: rows stay positional), and warnings."""
    from mergekitlite.vocabulary import (
        build_output_tokenizer,
        has_vocabulary_files,
        load_tokenizer,
        same_tokenizer_files,
        tokens_from_files,
        vocab_of,
    )

    choice = tokenizer_choice(recipe)
    cfg = recipe.tokenizer
    if choice is None or (cfg is not None and cfg.vocab_policy is not None):
        return None, []
    donor = config_donor if choice in ("base", "union") else choice
    models = list(dict.fromkeys([*merged, donor]))
    add = tuple(k for k in (cfg.tokens or {}) if isinstance(k, str)) if cfg else ()
    pad = cfg.pad_to_multiple_of if cfg else None
    rows = {m: embedding_rows(sources[m]) for m in models}
    if same_tokenizer_files([sources[m].path for m in models]) and not add:
        # One vocabulary for all (the common case): nothing to map, and nothing to load but its size.
        tokens = tokens_from_files(sources[donor].path)
        if tokens is None:
            if pad:
                problems.add(
                    f"tokenizer.pad_to_multiple_of: the tokenizer of {donor!r} cannot be read (no tokenizer.json)"
                )
            return None, []  # e.g. Qwen v1's tiktoken files: rows stay as they are
        if not pad and not (cfg and cfg.tokens) and all(r == len(tokens) for r in rows.values()):
            return None, []
        perms = {m: np.arange(len(tokens), dtype=np.int64) for m in models}
        return _vocab(choice, donor, tokens, perms, cfg, pad, False, add, None, problems), []

    if not any(has_vocabulary_files(sources[m].path) for m in models):
        return None, []  # no model has a tokenizer: nothing to map, rows stay as they are
    # The tokenizer source's must load. As in mergekit, a model whose tokenizer does not is taken to have the
    # base model's vocabulary (the source's, when the base has none either).
    notes = []
    try:
        tokenizers = {donor: load_tokenizer(sources[donor].path, donor)}
    except CheckpointError as exc:
        if (sources[donor].path / "tokenizer.json").is_file() or not has_vocabulary_files(sources[donor].path):
            raise
        # E.g. Qwen v1's tiktoken tokenizer, which only its own code reads; merging runs no model code.
        notes.append(
            f"{exc}; the embedding and lm_head rows are matched by position instead, as if the vocabularies were "
            "the same (mergekit with --trust-remote-code would match them by token)"
        )
        return None, notes
    for m in dict.fromkeys([config_donor, *models]):
        if m not in tokenizers:
            try:
                tokenizers[m] = load_tokenizer(sources[m].path, m)
            except CheckpointError as exc:
                like = config_donor if config_donor in tokenizers else donor
                tokenizers[m] = tokenizers[like]
                notes.append(f"{exc}: its rows are taken to follow the vocabulary of {like!r}, as mergekit does")
    others = [(tokenizers[m], rows[m]) for m in models if m != donor]
    out = build_output_tokenizer(choice, tokenizers[donor], others, add)
    vocab = out.get_vocab()
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    perms = {}
    for m in models:
        own = vocab_of(tokenizers[m], rows[m]).tokens
        perms[m] = np.array([own.get(t, -1) for t in tokens], dtype=np.int64)
    rebuilt = choice == "union" or len(vocab) != len(tokenizers[donor].get_vocab())
    return _vocab(choice, donor, tokens, perms, cfg, pad, rebuilt, add, out if rebuilt else None, problems), notes


def _vocab(
    choice: str,
    donor: str,
    tokens: Sequence[str],
    perms: Mapping[str, Any],
    cfg: TokenizerConfig | None,
    pad: int | None,
    rebuilt: bool,
    add: tuple[str, ...],
    tokenizer: Any,
    problems: Problems,
) -> OutputVocab:
    n = len(tokens)
    ids = {t: i for i, t in enumerate(tokens)}
    configs = _token_configs(cfg.tokens or {} if cfg else {}, ids, problems)
    padded = -(-n // pad) * pad if pad else n
    return OutputVocab(choice, donor, tuple(tokens), padded, perms, configs, rebuilt, add, tokenizer)


def _token_configs(
    tokens: Mapping[str | int, TokenSpec], vocab: Mapping[str, int], problems: Problems
) -> dict[int, tuple[str, TokenSpec]]:
    """``tokenizer.tokens`` by output id: a string key is a token's text (as in mergekit), an int key an id."""
    out: dict[int, tuple[str, TokenSpec]] = {}
    for key, spec in tokens.items():
        tid = key if isinstance(key, int) else vocab.get(key)
        if tid is None or tid >= len(vocab):
            problems.add(f"tokenizer.tokens: {key!r} is not a token of the output vocabulary", group="token")
            continue
        out[tid] = (str(key), spec)
    return out


# ------------------------------------------------------------------------------------------ per tensor


@dataclass(frozen=True)
class _Default:
    """Where a token's row comes from for a model that lacks it (or for all, when forced)."""

    pairs: tuple[tuple[str, int], ...]  # (model, row): one row, or several to average; () = zero
    force: bool = False


def _default_of(
    tid: int,
    present: list[str],
    base: str | None,
    vocab: OutputVocab,
    sources: Mapping[str, ModelSource],
    name: str,
    problems: Problems,
) -> _Default | None:
    """mergekit's ``assign_embedding_sources`` for one token; None when every model keeps its own row."""
    if tid in vocab.configs:
        key, spec = vocab.configs[tid]
        src = spec.source
        if src is not None and not (isinstance(src, TokenSource) and src.kind == "merge"):
            pairs = _configured(key, src, tid, vocab, sources, name, problems)
            if pairs is not None:
                return _Default(pairs, spec.force)
    if len(present) == 1:
        return _Default(((present[0], int(vocab.perms[present[0]][tid])),))
    if not present:
        return _Default(())
    if base is not None and base in present:
        return _Default(((base, int(vocab.perms[base][tid])),))
    return _Default(tuple((m, int(vocab.perms[m][tid])) for m in present))


def _configured(
    key: str,
    src: str | TokenSource,
    tid: int,
    vocab: OutputVocab,
    sources: Mapping[str, ModelSource],
    name: str,
    problems: Problems,
) -> tuple[tuple[str, int], ...] | None:
    if isinstance(src, TokenSource) and src.kind == "zero":
        return ()
    model = src if isinstance(src, str) else src.model
    assert model is not None  # the recipe loader requires it for model_token
    what = f"{key!r}"
    if isinstance(src, TokenSource) and src.kind == "model_token" and (src.token_id is not None or src.token):
        if src.token_id is not None:
            row, what = src.token_id, f"id {src.token_id}"
        else:
            from mergekitlite.vocabulary import load_tokenizer

            row, what = load_tokenizer(sources[model].path, model).get_vocab().get(src.token, -1), f"{src.token!r}"
    else:
        perm = vocab.perms.get(model)
        row = int(perm[tid]) if perm is not None else -1
    info = lookup_tensor(sources[model], name)
    if row < 0 or info is None or row >= info.shape[0]:
        problems.add(
            f"tokenizer.tokens: {key!r}: {what} is not a token of {model!r} (no row of it in {name!r})", group="token"
        )
        return None
    return ((model, row),)


def gathered_inputs(
    name: str,
    refs: Sequence[InputRef],
    base: str | None,
    vocab: OutputVocab,
    sources: Mapping[str, ModelSource],
    problems: Problems,
) -> list[InputRef]:
    """``refs`` re-indexed into the output vocabulary: each input's rows by token text, defaults for the
    tokens it lacks, padding rows. An input whose rows are already its own rows in order is left as is."""
    n = len(vocab.tokens)
    present = np.stack([(vocab.perms[r.model] >= 0) & (vocab.perms[r.model] < r.tensor.shape[0]) for r in refs])
    need = np.flatnonzero(~present.all(axis=0)).tolist()
    need = sorted(set(need) | {t for t in vocab.configs if t < n})
    models = [r.model for r in refs]
    defaults = {}
    for tid in need:
        have = [m for m, p in zip(models, present[:, tid]) if p]
        d = _default_of(tid, have, base, vocab, sources, name, problems)
        if d is not None:
            defaults[tid] = d
    return [_gathered(name, ref, k, present[k], defaults, vocab, sources) for k, ref in enumerate(refs)]


def _gathered(
    name: str,
    ref: InputRef,
    k: int,
    present: Any,
    defaults: Mapping[int, _Default],
    vocab: OutputVocab,
    sources: Mapping[str, ModelSource],
) -> InputRef:
    n, rows = len(vocab.tokens), vocab.rows
    index = np.zeros(rows, dtype=np.int16)
    row = np.zeros(rows, dtype=np.int64)
    row[:n] = np.where(present, vocab.perms[ref.model], 0)
    index[n:] = RowSource.PAD
    refs: list[InputRef] = [InputRef(ref.model, ref.tensor)]
    slot = {ref.model: 0}
    means: dict[int, tuple[tuple[int, int], ...]] = {}

    def ref_index(model: str) -> int:
        if model not in slot:
            info = lookup_tensor(sources[model], name)
            assert info is not None  # checked when the default was made
            slot[model] = len(refs)
            refs.append(InputRef(model, info))
        return slot[model]

    for tid, d in defaults.items():
        if present[tid] and not d.force:
            continue
        if not d.pairs:
            index[tid] = RowSource.ZERO
        elif len(d.pairs) == 1:
            index[tid], row[tid] = ref_index(d.pairs[0][0]), d.pairs[0][1]
        else:
            index[tid] = RowSource.MEAN
            means[tid] = tuple((ref_index(m), r) for m, r in d.pairs)
    identity = rows <= ref.tensor.shape[0] and not (index != 0).any() and bool((row == np.arange(rows)).all())
    if identity:
        return ref
    digest = hashlib.sha256(index.tobytes() + row.tobytes() + repr(sorted(means.items())).encode())
    digest.update(repr([(r.model, r.tensor.name) for r in refs]).encode())
    source = RowSource(tuple(refs), index, row, means, n, digest.hexdigest())
    return InputRef(ref.model, ref.tensor, source)
