"""An lm-eval objective term: a tiny local lm-eval task (a JSONL file read by the datasets' json builder, no
network) run once through the search on the demo chat model, scored as lm-eval's exact_match of greedy answers,
against answers generated here with plain transformers."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from evolve_helpers import CHAT, greedy_chat_answer

from mergekitlite.cli import main

QUESTIONS = ["What is the capital of France?", "What color is the sky?", "What is the capital of Japan?"]

TASK = """
task: tiny_chat_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  do_sample: false
  max_gen_toks: 32
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

SPEC = """
name: lm-eval-term
template:
  merge_method: linear
  models:
    - model: {chat}
      parameters: {{weight: {{search: float, low: 0.5, high: 1.5, init: 1.0}}}}
  dtype: float32
objective:
  - {{metric: lm_eval, task: tiny_chat_qa, include_path: {tasks}, result: "exact_match,none"}}
budget: {{trials: 1}}
"""


def test_a_local_lm_eval_task_as_an_objective(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))  # the search's workers inherit these
    answers = [greedy_chat_answer(q) for q in QUESTIONS]
    # Targets: the model's own answer for the first and the last question, a wrong one for the second.
    targets = [answers[0], "The sky is green.", answers[2]]
    expected = sum(a == t for a, t in zip(answers, targets, strict=True)) / len(QUESTIONS)
    assert expected == pytest.approx(2 / 3), answers
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "tiny_chat_qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": t}) + "\n" for q, t in zip(QUESTIONS, targets)))
    (tasks / "tiny_chat_qa.yaml").write_text(textwrap.dedent(TASK).format(data=data), encoding="utf-8")
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(SPEC).format(chat=CHAT, tasks=tasks), encoding="utf-8")
    out = tmp_path / "results"
    assert main(["evolve", str(spec), "--output", str(out), "-j", "1", "-q"]) == 0
    board = json.loads((out / "leaderboard.json").read_text(encoding="utf-8"))
    (trial,) = board["trials"]
    assert trial["params"] == {"models[0].parameters.weight": 1.0}  # the baseline: the chat model itself
    assert trial["metrics"] == {"lm_eval:tiny_chat_qa": pytest.approx(expected)}
    assert board["best_score"] == pytest.approx(expected)  # exact_match is higher-is-better: it enters as is
