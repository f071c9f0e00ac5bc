"""``mergekitlite eval OUT --against MODEL ...``: measure a merged model side by side with its parents.

Every model is fed the same token ids, made by one tokenizer (the merged model's), so the numbers
are comparable; every model must therefore share the merged model's vocabulary. Measured for each:

* **perplexity** of a text file: ``exp`` of the token-weighted mean negative log-likelihood. The
  text is cut into sliding windows of ``max_length`` tokens whose ends are ``stride`` apart; each
  token is scored once, in the first window that reaches it, so it has at least
  ``max_length − stride`` tokens of context (except near the start). The first token has no
  context and is not scored.
* **EOS-termination rate**: each prompt is rendered with the chat template as a user turn plus the
  assistant header, then greedily continued (argmax, no sampling, no repetition penalty) for at most
  ``max_new_tokens``; a generation terminates if it emits one of the model's own stop ids (its
  ``generation_config.json`` eos ids, else ``config.json``'s: what ``generate`` stops on when a user
  runs it). The seed's merge would score 0 here: it never emitted its end token.
* **end-of-turn probability**: with the prompt and the reference answer teacher-forced, the
  probability of the chat template's end-of-turn token (else eos) as the next token; mean and min
  over the prompts. A model that has learnt to close its turn puts most of its mass there.
* **KL(merged ‖ parent)**: the mean over the first ``kl_tokens`` scored positions of the text of
  ``Σ p_merged · (log p_merged − log p_parent)`` over the vocabulary, both next-token
  distributions computed with the same context.
* the first generations, side by side.

Models are loaded one at a time (the merged model first), so peak memory is one model plus the
merged model's log-probabilities at the KL positions (``kl_tokens × vocab`` float32 values).
Loading follows the seed's author: with ``--device auto`` or a memory limit, accelerate's
``device_map="auto"`` places layers within ``max_memory`` and offloads the rest to disk.

The package: ``options`` (what to measure, how to load; declared once, no torch), ``prompts`` (the prompt
set, chat template, end token), ``loading`` (opening and loading models), ``scoring`` (the
measurements on one model), ``report`` (results, Markdown and JSON), ``run`` (the whole run). Names are
exported lazily, so that importing ``mergekitlite.evaluate.options`` (the ``eval`` flags) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "EvalOptions": "options",
    "LoadOptions": "options",
    "PromptCase": "prompts",
    "choose_chat_template": "prompts",
    "default_prompts": "prompts",
    "end_token_of": "prompts",
    "load_prompts": "prompts",
    "render_prompt": "prompts",
    "check_device": "loading",
    "default_eval_threads": "loading",
    "from_pretrained_kwargs": "loading",
    "max_memory": "loading",
    "open_models": "loading",
    "Window": "scoring",
    "plan_windows": "scoring",
    "score_text": "scoring",
    "EvalReport": "report",
    "Generation": "report",
    "ModelResult": "report",
    "report_paths": "report",
    "to_markdown": "report",
    "write_report": "report",
    "EvalProgress": "run",
    "NullEvalProgress": "run",
    "measure_model": "run",
    "run_eval": "run",
}

if TYPE_CHECKING:
    from mergekitlite.evaluate.loading import (
        check_device,
        default_eval_threads,
        from_pretrained_kwargs,
        max_memory,
        open_models,
    )
    from mergekitlite.evaluate.options import EvalOptions, LoadOptions
    from mergekitlite.evaluate.prompts import (
        PromptCase,
        choose_chat_template,
        default_prompts,
        end_token_of,
        load_prompts,
        render_prompt,
    )
    from mergekitlite.evaluate.report import (
        EvalReport,
        Generation,
        ModelResult,
        report_paths,
        to_markdown,
        write_report,
    )
    from mergekitlite.evaluate.run import EvalProgress, NullEvalProgress, measure_model, run_eval
    from mergekitlite.evaluate.scoring import Window, plan_windows, score_text


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mergekitlite.evaluate.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mergekitlite.evaluate' has no attribute {name!r}")


__all__ = [
    "EvalOptions",
    "EvalProgress",
    "EvalReport",
    "Generation",
    "LoadOptions",
    "ModelResult",
    "NullEvalProgress",
    "PromptCase",
    "Window",
    "check_device",
    "choose_chat_template",
    "default_eval_threads",
    "default_prompts",
    "end_token_of",
    "from_pretrained_kwargs",
    "load_prompts",
    "max_memory",
    "measure_model",
    "open_models",
    "plan_windows",
    "render_prompt",
    "report_paths",
    "run_eval",
    "score_text",
    "to_markdown",
    "write_report",
]
