"""The whole run: the setup shared by every model (token ids, windows, prompts, end token), then each
model loaded and measured in turn."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mergekitlite.errors import MergekitliteError
from mergekitlite.evaluate.loading import check_device, input_device, load_tokenizer, loaded_model, open_models
from mergekitlite.evaluate.options import EvalOptions
from mergekitlite.evaluate.prompts import (
    PreparedPrompt,
    choose_chat_template,
    default_prompts,
    end_token_of,
    load_prompts,
    prepare_prompts,
)
from mergekitlite.evaluate.report import EvalReport, Generation, ModelResult
from mergekitlite.evaluate.scoring import (
    Window,
    end_probability,
    greedy_config,
    greedy_generate,
    plan_windows,
    score_text,
)
from mergekitlite.inspect_model import stop_ids
from mergekitlite.sources import ModelSource
from mergekitlite.tokens import read_token_info

DEFAULT_MAX_LENGTH = 2048  # cap on the window when the model's context is longer: logits are window × vocab


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length", "n_ctx")


def context_length(source: ModelSource) -> int | None:
    value = source.config_value(*_CONTEXT_KEYS)
    return int(value) if isinstance(value, int) and value > 0 else None


def vocabulary_problems(
    merged_name: str,
    merged_vocab: dict[str, int],
    merged_rows: int | None,
    name: str,
    vocab: dict[str, int],
    rows: int | None,
) -> list[str]:
    """Why ``name`` cannot be compared token for token with the merged model (empty: it can)."""
    problems = []
    if vocab != merged_vocab:
        differ = [t for t, i in merged_vocab.items() if vocab.get(t) != i]
        extra = [t for t in vocab if t not in merged_vocab]
        example = ""
        if differ:
            t = differ[0]
            there = f"id {vocab[t]}" if t in vocab else "absent"
            example = f"; e.g. {t!r} is id {merged_vocab[t]} in {merged_name} but {there} in {name}"
        elif extra:
            example = f"; e.g. {extra[0]!r} (id {vocab[extra[0]]}) exists only in {name}"
        problems.append(
            f"{name}: its tokenizer vocabulary differs from the merged model's ({len(vocab)} vs {len(merged_vocab)} "
            f"tokens{example}). eval compares next-token distributions (KL) and perplexities over one set of token "
            "ids, so every model must share the merged model's vocabulary"
        )
    if rows is not None and merged_rows is not None and rows != merged_rows:
        problems.append(
            f"{name}: its output layer has {rows} rows (config vocab_size) but {merged_name}'s has {merged_rows}: "
            "next-token distributions over different vocabularies cannot be compared"
        )
    return problems


@dataclass(frozen=True)
class EvalSetup:
    """Everything that is the same for every model: token ids, windows, prompts, the end token."""

    text_ids: torch.Tensor | None
    windows: tuple[Window, ...]
    prompts: tuple[PreparedPrompt, ...]
    end_token: str
    end_id: int
    max_new_tokens: int
    kl_tokens: int


class EvalProgress(Protocol):
    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def note(self, message: str) -> None: ...


class NullEvalProgress:
    """An EvalProgress that shows nothing."""

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def measure_generations(
    model: Any, tokenizer: Any, setup: EvalSetup, stops: Sequence[int], device: torch.device, progress: EvalProgress
) -> list[Generation]:
    config = greedy_config(stops, tokenizer.pad_token_id, setup.max_new_tokens)
    # generate() fills unset fields from model.generation_config: the greedy config must be the model's own.
    model.generation_config = config
    results = []
    progress.start("generating", len(setup.prompts))
    for p in setup.prompts:
        new = greedy_generate(model, p.prompt_ids, config, device)
        stop_at = next((i for i, t in enumerate(new) if t in stops), None)
        body = new if stop_at is None else new[:stop_at]
        text = tokenizer.decode(body, skip_special_tokens=False)
        results.append(Generation(p.prompt, text, len(new) if stop_at is None else stop_at + 1, stop_at is not None))
        progress.advance()
    return results


def measure_model(
    model: Any,
    tokenizer: Any,
    name: str,
    path: Path,
    role: str,
    setup: EvalSetup,
    reference: torch.Tensor | None,
    progress: EvalProgress,
) -> tuple[ModelResult, torch.Tensor | None]:
    """All measurements of one loaded model; also returns its KL-position log-probs when ``reference`` is None."""
    start = time.perf_counter()
    device = input_device(model)
    info = read_token_info(path)
    stops = stop_ids(info, (path / "generation_config.json").is_file())
    result = ModelResult(name=name, path=str(path), role=role, stop_ids=stops)
    kept = None
    if setup.text_ids is not None:
        progress.start("perplexity", int(sum(w.end - w.first_target for w in setup.windows)))
        score = score_text(
            model,
            setup.text_ids,
            setup.windows,
            device,
            kl_tokens=setup.kl_tokens,
            reference=reference,
            on_tokens=progress.advance,
        )
        result.perplexity, result.text_tokens = score.perplexity, score.tokens
        kept = score.kept
        if score.kl is not None and len(score.kl):
            result.kl_mean = float(score.kl.mean(dtype=torch.float64))
    if setup.prompts:
        gens = measure_generations(model, tokenizer, setup, stops, device, progress)
        result.generations = gens
        if stops:
            result.termination_rate = sum(g.terminated for g in gens) / len(gens)
        result.mean_new_tokens = sum(g.new_tokens for g in gens) / len(gens)
        with_answer = [p for p in setup.prompts if p.answer_ids]
        if with_answer:
            progress.start("end-token probability", len(with_answer))
            probs = []
            for p in with_answer:
                probs.append(end_probability(model, p.prompt_ids, p.answer_ids, setup.end_id, device))
                progress.advance()
            result.end_prob_mean, result.end_prob_min = sum(probs) / len(probs), min(probs)
    result.seconds = time.perf_counter() - start
    return result, kept


def text_ids(tokenizer: Any, path: Path, limit: int | None) -> torch.Tensor:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergekitliteError(f"--text {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise MergekitliteError(f"--text {path}: not UTF-8 text ({exc})") from None
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    if limit is not None:
        ids = ids[:limit]
    if len(ids) < 2:
        raise MergekitliteError(f"--text {path}: needs at least 2 tokens to score (has {len(ids)})")
    return torch.tensor(ids, dtype=torch.long)


def prepare(
    options: EvalOptions, models: Sequence[tuple[str, ModelSource]], tokenizers: Sequence[Any]
) -> tuple[EvalSetup, dict[str, Any]]:
    """Token ids, windows and prompts shared by every model, and the settings to report."""
    merged_name, merged = models[0]
    tokenizer = tokenizers[0]
    problems = []
    merged_vocab = tokenizer.get_vocab()
    merged_rows = merged.config_value("vocab_size")
    for (name, source), tok in zip(models[1:], tokenizers[1:], strict=True):
        problems += vocabulary_problems(
            merged_name, merged_vocab, merged_rows, name, tok.get_vocab(), source.config_value("vocab_size")
        )
    if problems:
        raise MergekitliteError("\n".join(problems))

    contexts = [c for c in (context_length(s) for _, s in models) if c]
    max_length = options.max_length or min([*contexts, DEFAULT_MAX_LENGTH])
    stride = options.stride or max(1, max_length // 2)
    ids = text_ids(tokenizer, options.text, options.max_text_tokens) if options.text else None
    windows = tuple(plan_windows(len(ids), max_length, stride)) if ids is not None else ()

    template, template_source = choose_chat_template(options.chat_template_from, [(n, s.path) for n, s in models])
    prompts_path = options.prompts or default_prompts()
    cases = load_prompts(prompts_path)[: options.max_prompts]
    merged_tokens = read_token_info(merged.path)
    merged_stops = stop_ids(merged_tokens, (merged.path / "generation_config.json").is_file())
    end_token, end_id = end_token_of(merged_tokens, template, tokenizer, merged_stops)
    setup = EvalSetup(
        ids,
        windows,
        prepare_prompts(tokenizer, template, cases),
        end_token,
        end_id,
        options.max_new_tokens,
        options.kl_tokens,
    )
    settings = {
        "text": str(options.text) if options.text else None,
        "text_tokens": len(ids) - 1 if ids is not None else 0,
        "max_length": max_length,
        "stride": stride,
        "windows": len(windows),
        "kl_tokens": min(options.kl_tokens, len(ids) - 1) if ids is not None else 0,
        "prompts": str(prompts_path),
        "prompt_count": len(cases),
        "chat_template_from": template_source,
        "end_token": end_token,
        "end_token_id": end_id,
        "max_new_tokens": options.max_new_tokens,
        "decoding": "greedy (argmax; no sampling, no repetition penalty)",
        "tokenizer": f"{merged_name} (shared by every model)",
        "device": options.load.device,
        "dtype": options.load.dtype,
        "max_ram": options.load.max_ram,
        "max_vram": options.load.max_vram,
    }
    return setup, settings


def run_eval(
    merged: str,
    against: Sequence[str],
    options: EvalOptions,
    progress: EvalProgress | None = None,
    models: list[tuple[str, ModelSource]] | None = None,
) -> EvalReport:
    """Measure the merged model, then each model in ``against``, one loaded at a time. ``models``: their
    ``open_models`` result, when the caller has it already."""
    progress = progress or NullEvalProgress()
    check_device(options.load)
    models = models if models is not None else open_models(merged, against)
    tokenizers = [load_tokenizer(s.path, options.load.trust_remote_code) for _, s in models]
    setup, settings = prepare(options, models, tokenizers)
    results: list[ModelResult] = []
    reference = None
    for i, (name, source) in enumerate(models):
        role = "merged" if i == 0 else "parent"
        progress.note(f"loading {name} ({role})")
        with loaded_model(source.path, options.load) as model:
            # Every model is fed the merged tokenizer's ids (checked identical); only the stop ids are its own.
            result, kept = measure_model(model, tokenizers[0], name, source.path, role, setup, reference, progress)
        if i == 0:
            reference = kept
        results.append(result)
        progress.note(f"{name}: done in {result.seconds:.1f} s")
    return EvalReport(merged, settings, results)
