"""The shipped tiny demo family (demo/models) and its two recipes: the seed's failure is real and
measurable, and eval's numbers on these models agree with values computed here by hand."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekitlite import MergeOptions, run_merge
from mergekitlite.evaluate import EvalOptions, run_eval

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "demo" / "data" / "continued_heldout.txt"
PROMPTS = ROOT / "demo" / "prompts.yaml"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is much faster than a spinning pool on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def at_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    # The recipes name the models relative to the repository root, as `make demo` runs them.
    monkeypatch.chdir(ROOT)
    return ROOT


def test_broken_recipe_never_stops_and_the_fixed_one_does(at_root: Path, tmp_path: Path, one_thread: None) -> None:
    rates = {}
    for name in ("demo", "demo-eos-broken"):
        out = tmp_path / name
        run_merge(at_root / "recipes" / f"{name}.yaml", out, MergeOptions(hash_inputs=False))
        report = run_eval(str(out), [], EvalOptions(prompts=PROMPTS, max_new_tokens=48))
        rates[name] = report.models[0].termination_rate
    # Measured: 100% vs 0% (demo/README.md). The thresholds leave room for numeric noise only.
    assert rates["demo"] >= 0.9, rates
    assert rates["demo-eos-broken"] <= 0.1, rates


def test_eval_perplexity_matches_a_manual_loss_loop(one_thread: None) -> None:
    model_dir = ROOT / "demo" / "models" / "continued"
    text = HELDOUT.read_text(encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tok(text, add_special_tokens=True)["input_ids"])
    n = len(ids)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids[None]).logits[0].double()
    nll = -torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None]).sum().item()
    expected = math.exp(nll / (n - 1))

    # One window over the whole text: every token after the first scored once, with full context.
    report = run_eval(
        str(model_dir),
        [],
        EvalOptions(text=HELDOUT, prompts=PROMPTS, max_new_tokens=1, max_length=n + 1, stride=n, max_prompts=1),
    )
    got = report.models[0].perplexity
    assert got == pytest.approx(expected, rel=1e-5)
    assert report.models[0].text_tokens == n - 1


def test_continued_model_learned_the_new_domain(one_thread: None) -> None:
    """The family is what the demo says: continued pretraining lowered the new domain's perplexity."""
    opts = EvalOptions(text=HELDOUT, prompts=PROMPTS, max_new_tokens=1, max_prompts=1)
    ppl = {
        name: run_eval(str(ROOT / "demo" / "models" / name), [], opts).models[0].perplexity
        for name in ("base", "continued")
    }
    assert ppl["continued"] < 0.5 * ppl["base"], ppl


def test_inspect_flags_the_eos_broken_demo_merge(
    at_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The seed's bug on the real demo output: <|im_end|> is trained (the chat vector taught the model to
    end its answers with it) but the base's metadata neither stops on it nor has a template that closes
    turns with it. inspect flags it, and --strict fails; the fixed merge has no flag."""
    from mergekitlite.cli import main
    from mergekitlite.inspect_model import open_and_inspect

    for name in ("demo", "demo-eos-broken"):
        run_merge(at_root / "recipes" / f"{name}.yaml", tmp_path / name, MergeOptions(hash_inputs=False))
    broken = open_and_inspect(str(tmp_path / "demo-eos-broken"))
    assert broken.stop_ids == [0] and not broken.chat_template
    assert len(broken.flags) == 1, broken.flags
    assert broken.flags[0].startswith("<|im_end|> (id 2) ends turns and the model can emit it (its lm_head row's norm")
    assert "but generation stops on eos ids [0] and there is no chat template" in broken.flags[0]
    im_end = next(row for row in broken.tokens if row.token == "<|im_end|>")
    assert broken.lm_head_stats is not None and im_end.lm_head_norm >= broken.lm_head_stats.threshold
    fixed = open_and_inspect(str(tmp_path / "demo"))
    assert fixed.flags == [] and 2 in fixed.stop_ids

    assert main(["inspect", str(tmp_path / "demo-eos-broken"), "--strict"]) == 1
    assert "1 flag(s)" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "demo"), "--strict"]) == 0
    assert "no flags" in capsys.readouterr().out
