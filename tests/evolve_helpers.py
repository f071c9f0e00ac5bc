"""Shared by the tests of `mergekitlite evolve`: the demo family's paths, a cheap search spec on it, greedy answers
of the demo chat model computed with plain transformers, and waiting on other processes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "demo" / "models" / "chat"
T = TypeVar("T")

# recipes/demo.yaml's structure, both weights and normalize free, a cheap objective: for tests of the machinery,
# not of the result.
_CHEAP_SPEC = """
name: {name}
template:
  merge_method: task_arithmetic
  base_model: {root}/demo/models/base
  models:
    - model: {root}/demo/models/continued
      parameters: {{weight: {{search: float, low: 0.0, high: 2.0}}}}
    - model: {root}/demo/models/chat
      parameters: {{weight: {{search: {chat}, low: 0.0, high: 2.0}}}}
  parameters:  # a choice: sampled by TPE beside CMA-ES
    normalize: {{search: choice, options: [false, true], init: false}}
  dtype: float32
  tokenizer_source: {root}/demo/models/chat
objective:
  - {{metric: perplexity, text: {root}/demo/data/continued_facts.txt, max_tokens: 512}}
  - {{metric: qa, path: {root}/demo/evolve/qa_chat.jsonl, score: answer_perplexity, limit: 8}}
budget: {{trials: {trials}}}
seed: 3
"""


def write_cheap_spec(path: Path, name: str, trials: int, chat_gradient: bool = False) -> Path:
    chat = "gradient, points: 2" if chat_gradient else "float"
    path.write_text(_CHEAP_SPEC.format(name=name, root=ROOT, chat=chat, trials=trials), encoding="utf-8")
    return path


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is much faster than a spinning pool on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def greedy_chat_answer(question: str, max_new_tokens: int = 32) -> str:
    """The demo chat model's greedy answer, rendered with its template, up to its end of turn."""
    tok = AutoTokenizer.from_pretrained(CHAT)
    model = AutoModelForCausalLM.from_pretrained(CHAT, dtype=torch.float32).eval()
    turn = [{"role": "user", "content": question}]
    prompt = tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with one_thread():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end
        )
    new = out[0, ids.shape[1] :].tolist()
    return tok.decode(new[: new.index(end)] if end in new else new)


def wait_for(predicate: Callable[[], T], timeout: float, what: str, log: Path | None = None) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tail = f"\n{log.read_text(errors='replace')[-3000:]}" if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}{tail}")
