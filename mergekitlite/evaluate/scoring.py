"""The measurements on one loaded model: perplexity over sliding windows, KL at the first positions,
greedy generations, the end-of-turn probability after a reference answer."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekitlite.errors import MergekitliteError

LOGPROB_ROWS = 256  # positions per log_softmax: bounds the float32 temporaries to 256 × vocab


@dataclass(frozen=True)
class Window:
    """Tokens ``begin:end`` are fed; targets ``first_target:end`` are scored."""

    begin: int
    end: int
    first_target: int


def plan_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Windows ending ``stride`` tokens apart, each the last ``max_length`` tokens up to its end, each
    scoring the tokens after the previous window's end: every token but the first is scored exactly
    once, with at least ``max_length − stride`` tokens of context (fewer only at the start)."""
    if max_length < 2 or not 1 <= stride < max_length:
        raise MergekitliteError(
            f"need max_length ≥ 2 and 1 ≤ stride < max_length, so that every scored token has context "
            f"(got max_length {max_length}, stride {stride})"
        )
    windows: list[Window] = []
    scored_to, end = 1, min(max_length, n_tokens)
    while scored_to < n_tokens:
        windows.append(Window(max(0, end - max_length), end, scored_to))
        scored_to, end = end, min(end + stride, n_tokens)
    return windows


def supports_logits_to_keep(model: Any) -> bool:
    """transformers' own causal LMs can compute logits for the last positions only (saving window × vocab)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def last_logits(model: Any, ids: torch.Tensor, keep: int, device: torch.device) -> torch.Tensor:
    """Logits ``[keep, vocab]`` of the last ``keep`` positions for one sequence of token ids."""
    kwargs = {"logits_to_keep": keep} if supports_logits_to_keep(model) else {}
    with torch.inference_mode():
        out = model(input_ids=ids.view(1, -1).to(device), use_cache=False, **kwargs)
    return out.logits[0, -keep:]


def iter_logprobs(
    model: Any, ids: torch.Tensor, windows: Sequence[Window], device: torch.device, rows: int = LOGPROB_ROWS
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(targets, log-probs)`` in text order: the float32 log-softmax of the positions predicting
    each scored token, ``rows`` positions at a time."""
    for w in windows:
        # Position j predicts token j + 1: the scored targets first_target..end-1 need the logits of
        # positions first_target-1..end-2, i.e. the last (end - first_target + 1) minus the very last.
        logits = last_logits(model, ids[w.begin : w.end], w.end - w.first_target + 1, device)[:-1]
        targets = ids[w.first_target : w.end]
        for s in range(0, len(targets), rows):
            lp = torch.log_softmax(logits[s : s + rows].float(), dim=-1)
            yield targets[s : s + rows].to(lp.device), lp


@dataclass
class TextScore:
    nll_sum: float = 0.0
    tokens: int = 0
    kept: torch.Tensor | None = None  # log-probs at the KL positions (the merged model's)
    kl: torch.Tensor | None = None  # KL(reference ‖ model) at each KL position

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else math.nan


def score_text(
    model: Any,
    ids: torch.Tensor,
    windows: Sequence[Window],
    device: torch.device,
    *,
    kl_tokens: int,
    reference: torch.Tensor | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> TextScore:
    """Negative log-likelihood over the windows, plus, for the first ``kl_tokens`` scored positions,
    either the log-probs themselves (``reference`` None) or KL(reference ‖ model) at each position.
    ``on_tokens(n)`` is called as each n scored positions are done (for a progress bar)."""
    score = TextScore()
    kept, kl = [], []
    pos = 0
    for targets, lp in iter_logprobs(model, ids, windows, device):
        score.nll_sum -= float(lp.gather(1, targets.view(-1, 1)).sum(dtype=torch.float64))
        score.tokens += len(targets)
        take = min(kl_tokens - pos, len(targets))
        if take > 0:
            rows = lp[:take].cpu()
            if reference is None:
                kept.append(rows.clone())
            else:
                ref = reference[pos : pos + take]
                kl.append(torch.nn.functional.kl_div(rows, ref, reduction="none", log_target=True).sum(-1))
            pos += take
        if on_tokens is not None:
            on_tokens(len(targets))
    if kept:
        score.kept = torch.cat(kept)
    if kl:
        score.kl = torch.cat(kl)
    return score


def greedy_config(stops: Sequence[int], pad_id: int | None, max_new_tokens: int) -> Any:
    """A generation config for plain greedy decoding that stops on ``stops``.

    It replaces the model's own generation config rather than overriding it: ``generate`` fills
    every unset field from the model's config, which could bring in a repetition penalty, a
    minimum length or suppressed tokens and make the run depend on more than the weights.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stops) or None,
        pad_token_id=pad_id if pad_id is not None else (stops[0] if stops else 0),
    )


def greedy_generate(model: Any, prompt_ids: Sequence[int], config: Any, device: torch.device) -> list[int]:
    """The new token ids of a greedy continuation of ``prompt_ids`` (``generate`` with ``config``)."""
    ids = torch.tensor([list(prompt_ids)], device=device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt_ids) :].tolist()


def end_probability(
    model: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int], end_id: int, device: torch.device
) -> float:
    """P(end_id | prompt + answer): the probability of closing the turn right after the reference answer."""
    logits = last_logits(model, torch.tensor([*prompt_ids, *answer_ids]), 1, device)
    return float(torch.softmax(logits[-1].float(), dim=-1)[end_id])
