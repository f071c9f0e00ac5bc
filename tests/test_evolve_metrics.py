"""The search's measurements on a model folder: the same numbers as `mergekitlite eval` for its metrics, and our
Q/A task (accuracy, answer perplexity) against values computed here with plain transformers."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from evolve_helpers import CHAT, ROOT, greedy_chat_answer, one_thread
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekitlite.errors import MergekitliteError
from mergekitlite.evaluate import EvalOptions, LoadOptions, run_eval
from mergekitlite.evolve.metrics import evaluate_terms, total_score
from mergekitlite.evolve.qa import QaItem, load_qa, matches
from mergekitlite.evolve.spec import TERM

BASE = ROOT / "demo" / "models" / "base"
HELDOUT = ROOT / "demo" / "data" / "continued_heldout.txt"
PROMPTS = ROOT / "demo" / "prompts.yaml"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def term(**kw):
    return TERM.validate_python(kw)


def test_eval_metrics_are_mergekitlite_evals() -> None:
    terms = [
        term(metric="perplexity", text=str(HELDOUT), max_tokens=600, max_length=128, stride=64),
        term(metric="eos_rate", prompts=str(PROMPTS), max_prompts=4, max_new_tokens=24, weight=2.0),
        term(metric="kl", parent=str(BASE), text=str(HELDOUT), tokens=100, max_length=128, stride=64),
    ]
    got = evaluate_terms(CHAT, terms, LoadOptions())
    report = run_eval(
        str(CHAT),
        [str(BASE)],
        EvalOptions(
            text=HELDOUT,
            prompts=PROMPTS,
            max_prompts=4,
            max_new_tokens=24,
            max_length=128,
            stride=64,
            max_text_tokens=600,
            kl_tokens=100,
        ),
    )
    merged, parent = report.models
    assert [r.name for r in got] == ["perplexity:continued_heldout", "eos_rate:prompts", "kl:base"]
    assert got[0].value == pytest.approx(merged.perplexity, rel=1e-12)
    assert got[1].value == merged.termination_rate  # 2 of 4 answers end within 24 tokens
    # KL over the first 100 positions of the whole text; eval measured it on the first 600 tokens: same positions.
    assert got[2].value == pytest.approx(parent.kl_mean, rel=1e-6)
    expected = -math.log(merged.perplexity) + 2.0 * merged.termination_rate - parent.kl_mean
    assert total_score(got) == pytest.approx(expected, rel=1e-6)


def _hand_answer_perplexity(items: list[QaItem]) -> float:
    tok = AutoTokenizer.from_pretrained(CHAT)
    model = AutoModelForCausalLM.from_pretrained(CHAT, dtype=torch.float32).eval()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    nll, n = 0.0, 0
    for item in items:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": item.question}], tokenize=False, add_generation_prompt=True
        )
        p = tok(prompt, add_special_tokens=False).input_ids
        a = [*tok(item.answer, add_special_tokens=False).input_ids, end]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + a])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        nll -= sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(a))
        n += len(a)
    return math.exp(nll / n)


def test_qa_answer_perplexity_and_accuracy(tmp_path: Path) -> None:
    question = "What is the capital of France?"
    answer = greedy_chat_answer(question)
    assert answer.strip(), "the chat model answers"
    words = answer.split()
    qa_file = tmp_path / "qa.jsonl"
    rows = [
        {"question": question, "answer": words[-1].upper()},  # contained (case-folded) in the greedy answer
        {"question": question, "answer": "zzz", "aliases": [answer.strip()]},  # matches through its alias
        {"question": "What color is the sky?", "answer": "no model says this"},
    ]
    qa_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    items = load_qa(qa_file)
    terms = [
        term(metric="qa", path=str(qa_file), score="answer_perplexity"),
        term(metric="qa", path=str(qa_file), name="contains"),
        term(metric="qa", path=str(qa_file), match="exact", name="exact", max_new_tokens=32),
    ]
    got = {r.name: r for r in evaluate_terms(CHAT, terms, LoadOptions())}
    hand = _hand_answer_perplexity(items)
    assert got["answer_ppl:qa"].value == pytest.approx(hand, rel=1e-5)
    assert got["answer_ppl:qa"].goodness == pytest.approx(-math.log(hand), rel=1e-5)
    assert got["contains"].value == pytest.approx(2 / 3)
    assert got["exact"].value == pytest.approx(1 / 3)  # only the alias is the whole answer


def test_matching_rules() -> None:
    item = QaItem("q", "Orrin Bay", ("オリン湾",))
    assert matches("The capital is  orrin\nbay.", item, "contains")
    assert not matches("The capital is Orrin.", item, "contains")
    assert matches(" ORRIN BAY ", item, "exact")
    assert matches("オリン湾", item, "exact")
    assert not matches("Orrin Bay.", item, "exact")


def test_qa_file_problems_all_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\nnot json\n{"question": "", "anwser": "a"}\n', encoding="utf-8")
    with pytest.raises(MergekitliteError) as info:
        load_qa(bad)
    assert str(info.value).splitlines() == [
        f"{bad}:2: not JSON (Expecting value at column 1)",
        f"{bad}:3: unknown key(s) ['anwser'] (expected question, answer, aliases)",
        f"{bad}:3: 'question' must be a non-empty string",
        f"{bad}:3: 'answer' must be a non-empty string",
    ]
