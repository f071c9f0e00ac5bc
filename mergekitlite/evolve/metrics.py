"""Measuring a merged model folder on the objective's terms, with `mergekitlite eval`'s measurements.

The merged model is loaded once per trial and every term but lm-eval's is measured on it; lm-eval then loads
the folder itself (its ``hf`` model), after ours is freed, so a trial holds one model at a time. Each term gives
a value (the metric as people read it: perplexity, a rate, nats) and a goodness that the score adds up,
× weight: the value where higher is better, −log(perplexity) (= −nats per token, so that halving a
perplexity counts the same at any scale), −KL.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekitlite.errors import MergekitliteError
from mergekitlite.evaluate.loading import input_device, load_tokenizer, loaded_model, open_models
from mergekitlite.evaluate.options import LoadOptions
from mergekitlite.evaluate.prompts import (
    PromptCase,
    choose_chat_template,
    default_prompts,
    end_token_of,
    load_prompts,
    prepare_prompts,
)
from mergekitlite.evaluate.run import (
    DEFAULT_MAX_LENGTH,
    EvalSetup,
    NullEvalProgress,
    context_length,
    measure_generations,
    text_ids,
    vocabulary_problems,
)
from mergekitlite.evaluate.scoring import last_logits, plan_windows, score_text
from mergekitlite.evolve.qa import load_qa, matches
from mergekitlite.evolve.spec import EosTerm, KlTerm, LmEvalTerm, PerplexityTerm, QaTerm, Term
from mergekitlite.inspect_model import stop_ids
from mergekitlite.tokens import read_token_info


@dataclass(frozen=True)
class TermResult:
    name: str
    value: float
    goodness: float
    weight: float


def total_score(results: Sequence[TermResult]) -> float:
    return sum(r.weight * r.goodness for r in results)


@dataclass(frozen=True)
class OpenedModel:
    """The merged model as a user runs it: its tokenizer, chat template, end-of-turn token and stop ids."""

    path: Path
    model: Any
    tokenizer: Any
    device: torch.device
    template: str | None
    end_token: str
    end_id: int
    stops: list[int]
    context: int | None


@contextmanager
def opened(folder: Path, load: LoadOptions) -> Iterator[OpenedModel]:
    ((_name, source),) = open_models(str(folder), [])
    tokenizer = load_tokenizer(folder, load.trust_remote_code)
    template, _where = choose_chat_template(None, [(str(folder), folder)])
    tokens = read_token_info(folder)
    stops = stop_ids(tokens, (folder / "generation_config.json").is_file())
    end_token, end_id = end_token_of(tokens, template, tokenizer, stops)
    with loaded_model(folder, load) as model:
        device = input_device(model)
        yield OpenedModel(folder, model, tokenizer, device, template, end_token, end_id, stops, context_length(source))


def _windows(n_tokens: int, max_length: int | None, stride: int | None, context: int | None) -> tuple[Any, ...]:
    length = max_length or min(context or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    return tuple(plan_windows(n_tokens, length, stride or max(1, length // 2)))


def perplexity(term: PerplexityTerm, m: OpenedModel) -> TermResult:
    ids = text_ids(m.tokenizer, Path(term.text), term.max_tokens)
    score = score_text(m.model, ids, _windows(len(ids), term.max_length, term.stride, m.context), m.device, kl_tokens=0)
    return TermResult(term.label, score.perplexity, -math.log(score.perplexity), term.weight)


def _generations(m: OpenedModel, cases: list[PromptCase], max_new_tokens: int) -> list[Any]:
    prompts = prepare_prompts(m.tokenizer, m.template, cases)
    setup = EvalSetup(None, (), prompts, m.end_token, m.end_id, max_new_tokens, 0)
    return measure_generations(m.model, m.tokenizer, setup, m.stops, m.device, NullEvalProgress())


def eos_rate(term: EosTerm, m: OpenedModel) -> TermResult:
    cases = load_prompts(Path(term.prompts) if term.prompts else default_prompts())[: term.max_prompts]
    # A model without stop ids never ends its answer, whatever it writes.
    rate = sum(g.terminated for g in _generations(m, cases, term.max_new_tokens)) / len(cases) if m.stops else 0.0
    return TermResult(term.label, rate, rate, term.weight)


def qa(term: QaTerm, m: OpenedModel) -> TermResult:
    items = load_qa(Path(term.path), term.limit)
    cases = [PromptCase(i.question, i.answer) for i in items]
    if term.score == "accuracy":
        gens = _generations(m, cases, term.max_new_tokens)
        acc = sum(matches(g.text, item, term.match) for g, item in zip(gens, items, strict=True)) / len(items)
        return TermResult(term.label, acc, acc, term.weight)
    nll, count = 0.0, 0
    for p in prepare_prompts(m.tokenizer, m.template, cases):
        # The reference answer and then the end of the turn: a model that knows the answer but rambles on pays.
        targets = [*p.answer_ids, m.end_id]
        ids = torch.tensor([*p.prompt_ids, *targets])
        logits = last_logits(m.model, ids, len(targets) + 1, m.device)[:-1]
        lp = torch.log_softmax(logits.float(), dim=-1)
        nll -= float(lp.gather(1, torch.tensor(targets, device=lp.device).view(-1, 1)).sum(dtype=torch.float64))
        count += len(targets)
    return TermResult(term.label, math.exp(nll / count), -nll / count, term.weight)


@functools.lru_cache(maxsize=4)
def parent_logprobs(parent: str, text: str, tokens: int, max_length: int | None, stride: int | None, load: LoadOptions):
    """(token ids, the parent's log-probs at the first ``tokens`` scored positions), computed once per process:
    every trial compares against the same parent (a memo of a pure function; it holds tokens × vocab floats)."""
    path = Path(parent)
    ((_name, source),) = open_models(parent, [])
    tokenizer = load_tokenizer(path, load.trust_remote_code)
    ids = text_ids(tokenizer, Path(text), None)
    windows = _windows(len(ids), max_length, stride, context_length(source))
    with loaded_model(path, load) as model:
        score = score_text(model, ids, windows, input_device(model), kl_tokens=tokens)
    return ids, windows, score.kept, tokenizer.get_vocab(), source.config_value("vocab_size")


def kl(term: KlTerm, m: OpenedModel, load: LoadOptions) -> TermResult:
    ids, windows, reference, vocab, rows = parent_logprobs(
        term.parent, term.text, term.tokens, term.max_length, term.stride, load
    )
    problems = vocabulary_problems(
        "the merged model", m.tokenizer.get_vocab(), m.model.config.vocab_size, term.parent, vocab, rows
    )
    if problems:
        raise MergekitliteError("\n".join(problems))
    merged = score_text(m.model, ids, windows, m.device, kl_tokens=term.tokens).kept
    # kl_div(input=log q, target=log p) = Σ p (log p − log q): KL(merged ‖ parent) with p the merged model.
    per_position = torch.nn.functional.kl_div(reference, merged, reduction="none", log_target=True).sum(-1)
    value = float(per_position.mean(dtype=torch.float64))
    return TermResult(term.label, value, -value, term.weight)


def lm_eval_task(term: LmEvalTerm, folder: Path, load: LoadOptions) -> TermResult:
    """One lm-eval task on the merged folder (lm-eval's ``hf`` model loads it)."""
    try:
        import lm_eval
    except ImportError:
        raise MergekitliteError(
            f"objective {term.label}: lm-eval is not installed (pip install 'mergekitlite[evolve]')"
        ) from None
    args: dict[str, Any] = {"pretrained": str(folder), "dtype": load.dtype, "trust_remote_code": load.trust_remote_code}
    try:
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=args,
            tasks=[term.task],
            task_manager=_task_manager(term.include_path),
            limit=term.limit,
            num_fewshot=term.num_fewshot,
            batch_size=term.batch_size,
            device="cpu" if load.device == "auto" else load.device,
            apply_chat_template=term.apply_chat_template,
            log_samples=False,
        )
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise MergekitliteError(f"objective {term.label}: lm-eval could not run task {term.task!r}: {exc}") from None
    results = (out or {}).get("results", {}).get(term.task)
    if results is None or term.result not in results:
        have = sorted(k for k in (results or {}) if "stderr" not in k and k != "alias")
        raise MergekitliteError(
            f"objective {term.label}: lm-eval gave no {term.result!r} for {term.task} (it has {have})"
        )
    value = float(results[term.result])
    higher = out.get("higher_is_better", {}).get(term.task, {}).get(term.result.split(",")[0], True)
    return TermResult(term.label, value, value if higher else -value, term.weight)


@functools.lru_cache(maxsize=2)
def _task_manager(include_path: str | None) -> Any:
    """lm-eval's task index, once per process. With ``include_path`` only that folder is indexed: indexing the
    thousands of built-in tasks took over a minute here, for a task that lives in the folder."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=False) if include_path else TaskManager()


def evaluate_terms(folder: Path, terms: Sequence[Term], load: LoadOptions) -> list[TermResult]:
    """Every term measured on the merged model in ``folder``, in the order given."""
    results: dict[str, TermResult] = {}
    own = [t for t in terms if not isinstance(t, LmEvalTerm)]
    if own:
        with opened(folder, load) as m:
            for t in own:
                if isinstance(t, PerplexityTerm):
                    results[t.label] = perplexity(t, m)
                elif isinstance(t, EosTerm):
                    results[t.label] = eos_rate(t, m)
                elif isinstance(t, QaTerm):
                    results[t.label] = qa(t, m)
                elif isinstance(t, KlTerm):
                    results[t.label] = kl(t, m, load)
    for t in terms:
        if isinstance(t, LmEvalTerm):
            results[t.label] = lm_eval_task(t, folder, load)
    return [results[t.label] for t in terms]
