"""Rows of the embedding and lm_head that the merge method does not decide: vocabulary-size
mismatches between inputs (``vocab_policy``), single tokens set by the recipe (``tokenizer.tokens``,
``special_tokens``), and the warning for the seed's failure (a chat model merged with a base's
tokenizer, template and stop tokens)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from mergekitlite.plan.inputs import lookup_tensor
from mergekitlite.plan.problems import Problems
from mergekitlite.recipe import Recipe
from mergekitlite.roles import is_vocab_tensor
from mergekitlite.sources import ModelSource
from mergekitlite.taskgraph import InputRef, RowRule
from mergekitlite.tokens import TokenInfo, read_token_info


def vocab_layout(
    name: str, refs: Sequence[InputRef], lead: InputRef, donor: InputRef | None, policy: str
) -> tuple[tuple[int, ...], int, tuple[RowRule, ...], str] | None:
    """Embedding/lm_head rows when the inputs' vocabularies differ: the output has the tokenizer
    donor's rows (else the reference model's); rows all inputs have are merged; the rest follow
    ``policy``."""
    shapes = [r.tensor.shape for r in refs]
    if not all(len(s) == 2 for s in shapes) or len({s[1] for s in shapes}) != 1 or not is_vocab_tensor(name, shapes[0]):
        return None
    if donor is None or donor.tensor.shape[1:] != shapes[0][1:]:
        donor = lead
    out_rows = donor.tensor.shape[0]
    merge_rows = min(min(s[0] for s in shapes), out_rows)
    rules: list[RowRule] = []
    if merge_rows < out_rows:
        if policy == "zero":
            rules.append(RowRule(merge_rows, out_rows, "zero", why="vocab_policy: zero"))
        elif policy == "mean":
            bounds = sorted({merge_rows, out_rows, *(min(s[0], out_rows) for s in shapes)})
            for a, b in itertools.pairwise(bounds):
                have = tuple(r for r in refs if r.tensor.shape[0] >= b)
                rules.append(RowRule(a, b, "mean", have, why="vocab_policy: mean"))
        else:
            rules.append(RowRule(merge_rows, out_rows, "take", (donor,), why=f"vocab_policy: keep from {donor.model}"))
    listing = ", ".join(f"{r.tensor.shape[0]} in {r.model!r}" for r in refs)
    note = (
        f"{name!r}: the vocabularies differ ({listing}); the output has {out_rows} rows, rows 0..{merge_rows - 1} "
        f"are merged" + (f", rows {merge_rows}..{out_rows - 1}: {rules[0].why}" if rules else "")
    )
    return (out_rows, shapes[0][1]), merge_rows, tuple(rules), note


def token_rules(
    name: str,
    shape: tuple[int, ...],
    cfg: Any,
    tok: TokenInfo,
    sources: Mapping[str, ModelSource],
    donor: str,
    problems: Problems,
    *,
    tokens_merged: bool = False,
) -> tuple[RowRule, ...]:
    """Rows of single tokens set by the recipe's ``tokenizer.tokens`` and ``special_tokens``, applied to the
    merged rows. With ``tokens_merged`` the ``tokens`` settings were applied to the inputs before the merge
    (``plan/vocab.py``): here they only exempt their tokens from ``special_tokens``."""
    if cfg is None:
        return ()
    rows = shape[0]
    wanted: dict[int, tuple[Any, str]] = {}
    if cfg.special_tokens != "merge":
        for text in sorted(tok.special):
            tid = tok.id_of(text)
            if tid is not None:
                wanted[tid] = (cfg.special_tokens, text)
    for key, spec in (cfg.tokens or {}).items():
        if tokens_merged:
            tid = key if isinstance(key, int) else tok.id_of(str(key))
            wanted.pop(tid, None)  # type: ignore[arg-type]
            continue
        tid = key if isinstance(key, int) else int(key) if str(key).isdigit() else tok.id_of(str(key))
        if tid is None:
            problems.add(f"tokenizer.tokens: {key!r} is not a token of {donor!r} (give its id instead)", group="token")
            continue
        wanted[tid] = (spec.source, str(key))
    rules = []
    for tid, (action, label) in sorted(wanted.items()):
        if tid >= rows:
            problems.add(f"tokenizer.tokens: {label!r} (id {tid}) is past the {rows} rows of {name!r}", group="token")
            continue
        if action in (None, "merge") or getattr(action, "kind", None) == "merge":
            continue
        if action == "zero" or getattr(action, "kind", None) == "zero":
            rules.append(RowRule(tid, tid + 1, "zero", why=f"token {label}: zero"))
            continue
        model = donor if action == "take" else action if isinstance(action, str) else action.model
        src_tok = (
            None if isinstance(action, str) else (action.token_id if action.token_id is not None else action.token)
        )
        src_row = tid
        if isinstance(src_tok, int):
            src_row = src_tok
        elif isinstance(src_tok, str):
            found = read_token_info(sources[model].path).id_of(src_tok)
            if found is None:
                problems.add(f"tokenizer.tokens: {src_tok!r} is not a token of {model!r}", group="token")
                continue
            src_row = found
        info = lookup_tensor(sources[model], name)
        if info is None or src_row >= info.shape[0] or info.shape[1:] != shape[1:]:
            problems.add(f"tokenizer.tokens: {model!r} has no row {src_row} of {name!r} for {label!r}", group="token")
            continue
        rules.append(
            RowRule(tid, tid + 1, "take", (InputRef(model, info),), src_row, why=f"token {label}: from {model}")
        )
    return tuple(rules)


def eos_warnings(recipe: Recipe, sources: Mapping[str, ModelSource], donor: str) -> list[str]:
    """The seed's failure, caught before merging: the output gets its tokenizer, chat template and
    stop tokens from a model without a chat template while another input has one."""
    if recipe.chat_template is not None:
        return []
    mine = read_token_info(sources[donor].path)
    if mine.chat_template:
        return []
    chatty = [ref for ref, src in sources.items() if ref != donor and read_token_info(src.path).chat_template]
    if not chatty:
        return []
    ends = read_token_info(sources[chatty[0]].path).turn_end_tokens()
    ends_txt = f", which ends turns with {', '.join(ends)}" if ends else ""
    return [
        f"the tokenizer, chat template and generation config come from {donor!r}, which has no chat template, "
        f"but {chatty[0]!r} has one{ends_txt}: a chat model merged this way may never stop generating. "
        f"Set `tokenizer_source: {chatty[0]}` to take them from the chat model."
    ]
