"""``mergekitlite eval``: every number is checked against a value computed here independently, with
plain forward passes, log_softmax and gather; generation against a hand-written greedy loop.

The termination rate is checked on "bigram" models whose greedy output is known exactly: one answers
``ab<|im_end|>`` to anything (rate 1.0), one answers ``abab…`` forever (0.0), and one says
``ab<|im_end|>`` but its generation_config only stops on ``<|endoftext|>`` (0.0: the seed's merge).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import tiny_lm
import torch
import yaml

from mergekitlite.cli import main
from mergekitlite.errors import MergekitliteError
from mergekitlite.evaluate import (
    EvalOptions,
    EvalReport,
    LoadOptions,
    ModelResult,
    default_eval_threads,
    default_prompts,
    end_token_of,
    from_pretrained_kwargs,
    load_prompts,
    plan_windows,
    report_paths,
    run_eval,
)
from mergekitlite.tokens import TokenInfo

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TEXT = (
    "Merging models by weight arithmetic is cheap: no gradient is computed. A chat vector is the difference "
    "between a chat model and its base, added to another model trained from the same base.\n"
)
PROMPTS = [
    {"prompt": "Hello?", "reference": "Hi there."},
    {"prompt": "What is 2+2?", "reference": "Four."},
    {"prompt": "Name a colour.", "reference": "Blue."},
]
MAX_NEW = 6
KL_TOKENS = 50


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # Forward passes of tiny models are dominated by thread hand-offs; on a shared 2-core machine one
    # thread is ~10x faster. Restored afterwards for the other test modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    tok = tiny_lm.make_tokenizer()
    a, b, end = tok.convert_tokens_to_ids(["a", "b", tiny_lm.IM_END])

    def stopper(i: int) -> int:
        return b if i == a else end if i == b else a

    def looper(i: int) -> int:
        return b if i == a else a

    merged = tiny_lm.random_lm(root / "merged", 1, tok)
    paths = {
        "merged": merged,
        "parent": tiny_lm.random_lm(root / "parent", 2, tok, like=merged),
        "stop": tiny_lm.bigram_lm(root / "stop", tok, stopper),
        "never": tiny_lm.bigram_lm(root / "never", tok, looper),
        "wrong_eos": tiny_lm.bigram_lm(root / "wrong_eos", tok, stopper, eos=(tiny_lm.ENDOFTEXT,)),
        "no_template": tiny_lm.random_lm(root / "no_template", 3, tok, like=merged, chat_template=None),
        "other_vocab": tiny_lm.random_lm(root / "other_vocab", 4, tiny_lm.make_tokenizer(extra_chars="é")),
        "text": root / "text.txt",
        "prompts": root / "prompts.yaml",
    }
    paths["text"].write_text(TEXT, encoding="utf-8")
    paths["prompts"].write_text(yaml.safe_dump(PROMPTS), encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def report(fam: dict[str, Path]) -> EvalReport:
    """One run over every kind of model: the text fits one window, so the reference is one forward pass."""
    options = EvalOptions(
        text=fam["text"], prompts=fam["prompts"], max_new_tokens=MAX_NEW, max_length=256, kl_tokens=KL_TOKENS
    )
    others = [str(fam[k]) for k in ("parent", "stop", "never", "wrong_eos")]
    return run_eval(str(fam["merged"]), others, options)


def by_name(report: EvalReport, path: Path) -> ModelResult:
    return next(r for r in report.models if r.name == str(path))


# ------------------------------------------------------------------------------------------ references


def load(path: Path) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def logprobs(path: Path, ids: list[int]) -> torch.Tensor:
    """float64 log-softmax of a plain forward pass over ``ids``: row j predicts ids[j + 1]."""
    with torch.no_grad():
        logits = load(path)(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def text_ids(path: Path) -> list[int]:
    return tokenizer(path)(TEXT)["input_ids"]


def chatml_prompt(prompt: str) -> str:
    """ChatML written out by hand (not through the template engine)."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def manual_greedy(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, stops: list[int], limit: int
) -> tuple[list[int], bool]:
    ids = tok(chatml_prompt(prompt), add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(limit):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            new.append(nxt)
            ids.append(nxt)
            if nxt in stops:
                return new, True
    return new, False


# ------------------------------------------------------------------------------------------ perplexity and KL


def test_perplexity_matches_a_plain_forward_pass(fam, report):
    ids = text_ids(fam["merged"])
    for name in ("merged", "parent"):
        lp = logprobs(fam[name], ids)
        nll = -lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        expected = math.exp(float(nll.mean()))
        got = by_name(report, fam[name])
        assert got.text_tokens == len(ids) - 1
        assert got.perplexity == pytest.approx(expected, rel=1e-5)


def test_perplexity_over_sliding_windows_matches_a_manual_loop(fam):
    ids = text_ids(fam["merged"])
    max_length, stride = 48, 20
    # Window ends `stride` apart, each window the last `max_length` tokens, scoring only the new tokens.
    nll, scored, prev_end, end = 0.0, [], 1, max_length
    while prev_end < len(ids):
        begin = max(0, end - max_length)
        lp = logprobs(fam["merged"], ids[begin:end])
        for j in range(prev_end, end):
            assert j - begin >= min(j, max_length - stride)  # context
            nll -= float(lp[j - begin - 1, ids[j]])
            scored.append(j)
        prev_end, end = end, min(end + stride, len(ids))
    assert scored == list(range(1, len(ids)))
    options = EvalOptions(
        text=fam["text"], prompts=fam["prompts"], max_prompts=1, max_new_tokens=1, max_length=max_length, stride=stride
    )
    got = run_eval(str(fam["merged"]), [], options).models[0]
    assert got.perplexity == pytest.approx(math.exp(nll / len(scored)), rel=1e-5)


def test_kl_matches_manual_softmaxes(fam, report):
    ids = text_ids(fam["merged"])
    p = logprobs(fam["merged"], ids)[:KL_TOKENS]
    for name in ("parent", "never"):
        q = logprobs(fam[name], ids)[:KL_TOKENS]
        expected = float((p.exp() * (p - q)).sum(-1).mean())
        assert by_name(report, fam[name]).kl_mean == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert by_name(report, fam["merged"]).kl_mean is None
    assert report.settings["kl_tokens"] == KL_TOKENS


def test_plan_windows_scores_every_token_once():
    for n, length, stride in [(2, 2, 1), (10, 4, 3), (10, 4, 1), (100, 16, 7), (5, 64, 32)]:
        windows = plan_windows(n, length, stride)
        targets = [j for w in windows for j in range(w.first_target, w.end)]
        assert targets == list(range(1, n)), (n, length, stride)
        assert all(w.end - w.begin <= length and w.first_target > w.begin for w in windows)
    with pytest.raises(MergekitliteError, match="stride < max_length"):
        plan_windows(10, 4, 4)


# ------------------------------------------------------------------------------------------ termination


def test_termination_rate_is_exact_on_models_with_known_answers(fam, report):
    assert by_name(report, fam["stop"]).termination_rate == 1.0
    assert by_name(report, fam["never"]).termination_rate == 0.0
    # Says "ab<|im_end|>" but its generation_config stops only on <|endoftext|>: how the seed's merge ran on.
    assert by_name(report, fam["wrong_eos"]).termination_rate == 0.0
    stop = by_name(report, fam["stop"])
    assert [g.text for g in stop.generations] == ["ab"] * len(PROMPTS)
    assert stop.mean_new_tokens == 3
    never = by_name(report, fam["never"])
    assert [g.text for g in never.generations] == ["ababab"] * len(PROMPTS)
    assert never.mean_new_tokens == MAX_NEW
    assert by_name(report, fam["wrong_eos"]).generations[0].text == "ab<|im_end|>ab<|im_end|>"


def test_generations_match_a_manual_greedy_loop(fam, report):
    for name in ("merged", "parent", "stop", "wrong_eos"):
        result = by_name(report, fam[name])
        tok, model = tokenizer(fam[name]), load(fam[name])
        for case, gen in zip(PROMPTS, result.generations, strict=True):
            new, terminated = manual_greedy(model, tok, case["prompt"], result.stop_ids, MAX_NEW)
            assert gen.terminated == terminated
            assert gen.new_tokens == len(new)
            assert gen.text == tok.decode(new[:-1] if terminated else new, skip_special_tokens=False)
    assert by_name(report, fam["stop"]).stop_ids == [2, 0]  # generation_config eos: <|im_end|>, <|endoftext|>
    assert by_name(report, fam["wrong_eos"]).stop_ids == [0]


def test_end_token_probability_matches_a_forward_pass(fam, report):
    tok = tokenizer(fam["merged"])
    end = tok.convert_tokens_to_ids(tiny_lm.IM_END)
    assert (report.settings["end_token"], report.settings["end_token_id"]) == (tiny_lm.IM_END, end)
    for name in ("merged", "parent", "stop"):
        probs = []
        for case in PROMPTS:
            ids = tok(chatml_prompt(case["prompt"]), add_special_tokens=False)["input_ids"]
            ids += tok(case["reference"], add_special_tokens=False)["input_ids"]
            probs.append(float(logprobs(fam[name], ids)[-1, end].exp()))
        got = by_name(report, fam[name])
        assert got.end_prob_mean == pytest.approx(sum(probs) / len(probs), rel=1e-5, abs=1e-9)
        assert got.end_prob_min == pytest.approx(min(probs), rel=1e-5, abs=1e-9)


# ------------------------------------------------------------------------------------------ inputs


def test_chat_template_from_the_first_model_that_has_one(fam):
    options = EvalOptions(prompts=fam["prompts"], max_prompts=1, max_new_tokens=1)
    got = run_eval(str(fam["no_template"]), [str(fam["parent"])], options)
    assert got.settings["chat_template_from"] == f"{fam['parent']} (the merged model has none)"
    assert got.settings["end_token"] == tiny_lm.IM_END
    assert got.models[0].perplexity is None  # no --text: skipped, not invented
    explicit = run_eval(
        str(fam["no_template"]),
        [],
        EvalOptions(prompts=fam["prompts"], max_prompts=1, max_new_tokens=1, chat_template_from="chatml"),
    )
    assert explicit.settings["chat_template_from"] == "built-in template 'chatml'"


def test_end_token_found_through_the_tokenizer_when_the_json_files_do_not_list_it():
    # Qwen-14B's tiktoken tokenizer has no tokenizer.json: its JSON files name no special token at all.
    tok, bare = tiny_lm.make_tokenizer(), TokenInfo(Path("."))
    assert end_token_of(bare, tiny_lm.CHATML, tok, [0]) == (tiny_lm.IM_END, 2)
    assert end_token_of(bare, None, tok, [2]) == (tiny_lm.ENDOFTEXT, 0)  # no template: the tokenizer's eos


def test_default_prompt_set_is_packaged():
    cases = load_prompts(default_prompts())
    assert 10 <= len(cases) <= 20
    assert all(c.reference for c in cases)
    assert any("まど☆マギ" in c.prompt for c in cases)
    assert any(c.prompt.isascii() for c in cases)


def test_bad_prompt_file_lists_every_problem(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("- prompt: 1\n- {prompt: ok, answer: x}\n- just text\n", encoding="utf-8")
    with pytest.raises(MergekitliteError) as err:
        load_prompts(bad)
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert "item 0: 'prompt' must be a non-empty string" in lines[0]
    assert "item 1: unknown key(s) ['answer']" in lines[1]
    assert "item 2: expected a mapping" in lines[2]


def test_memory_limits_use_accelerate_device_map(tmp_path):
    kwargs = from_pretrained_kwargs(LoadOptions(max_ram=3 * 10**9), tmp_path)
    assert kwargs["device_map"] == "auto"
    assert kwargs["max_memory"]["cpu"] == 3 * 10**9
    assert not any(isinstance(k, int) for k in kwargs["max_memory"])  # --device cpu: no GPU gets layers
    assert kwargs["offload_folder"] == str(tmp_path)
    plain = from_pretrained_kwargs(LoadOptions(dtype="bfloat16"), tmp_path)
    assert plain["device_map"] == "cpu" and plain["dtype"] is torch.bfloat16 and "max_memory" not in plain
    assert report_paths(Path("r")) == (Path("r.md"), Path("r.json"))
    assert report_paths(Path("r.json")) == (None, Path("r.json"))


# ------------------------------------------------------------------------------------------ command line


def test_cli_writes_tables_and_reports(fam, tmp_path, capsys):
    out = tmp_path / "reports" / "eval"
    code = main(
        [
            "eval",
            str(fam["merged"]),
            "--against",
            str(fam["parent"]),
            str(fam["stop"]),
            "--text",
            str(fam["text"]),
            "--prompts",
            str(fam["prompts"]),
            "--max-new-tokens",
            str(MAX_NEW),
            "--max-length",
            "256",
            "--kl-tokens",
            str(KL_TOKENS),
            "--show",
            "2",
            "--report",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert "perplexity" in text and "KL(merged‖model)" in text and "ab ⏹" in text
    data = json.loads(out.with_name("eval.json").read_text(encoding="utf-8"))
    assert [m["role"] for m in data["models"]] == ["merged", "parent", "parent"]
    assert data["models"][2]["termination_rate"] == 1.0
    md = out.with_name("eval.md").read_text(encoding="utf-8")
    assert "| model | role | perplexity |" in md and "## Generations" in md


def test_cli_vocabulary_mismatch_is_a_clear_error(fam, capsys):
    code = main(["eval", str(fam["merged"]), "--against", str(fam["other_vocab"]), "--max-prompts", "1", "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{fam['other_vocab']}: its tokenizer vocabulary differs from the merged model's" in err
    assert "'é'" in err


def test_cli_missing_model(fam, tmp_path, capsys):
    code = main(["eval", str(fam["merged"]), "--against", str(tmp_path / "nope"), "-q"])
    assert code == 2
    assert "no such folder" in capsys.readouterr().err


def test_small_models_are_evaluated_on_one_thread(fam, monkeypatch):
    """Without -j, models under 100M parameters get one thread (a pool only slows them on a busy
    machine); larger ones keep torch's default; a model that cannot be opened is an error, exit 2."""
    import mergekitlite.evaluate.loading as loading

    models = loading.open_models(str(fam["merged"]), [str(fam[k]) for k in ("parent", "stop")])
    assert default_eval_threads(models) == 1
    monkeypatch.setattr(loading, "SMALL_MODEL_PARAMS", 10)
    assert default_eval_threads(models) is None
    # A model that cannot be opened is still reported as before: the command's clear error, exit 2.
    assert main(["eval", str(fam["merged"]) + "-missing", "--against", str(fam["parent"])]) == 2
