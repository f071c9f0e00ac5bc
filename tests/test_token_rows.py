"""Embedding and lm_head rows of single tokens (``tokenizer.tokens``, ``tokenizer.special_tokens``)
and of vocabularies of different sizes (``tokenizer.vocab_policy``): every row of both matrices is
compared, bitwise, with the row the recipe asks for - a model's row, zeros, the mean of the models
that have it, or the merge formula's value computed here."""

from __future__ import annotations

import time
from pathlib import Path

import builders
import pytest
import torch
from builders import assert_bitwise, load_tensors, read_config, ref_task_arithmetic

from mergekitlite import MergeOptions, run_merge
from mergekitlite.cli import merge_main
from mergekitlite.errors import PlanError

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
VOCAB_MATRICES = (EMBED, HEAD)
V = builders.VOCAB  # 64
EOT, IM_START, IM_END = 60, 61, 62  # <|endoftext|>, <|im_start|>, <|im_end|>
SPECIAL_IDS = (0, EOT, IM_START, IM_END)  # <unk> too
W = {"a": 0.7, "chat": 1.0}
DELAY = 0.03
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture
def slow_merge_of_rows_set_by_rules(monkeypatch):
    """Row rules are applied after the merge, in order. Workers run chunks concurrently, so an
    executor that did not enforce that order could let the merged rows, or an earlier rule's rows,
    land after a later rule's rows - sometimes. Here the merge of tensors that have row rules takes
    2·DELAY longer and vocab_policy rules (which precede the token rules) DELAY longer, so that with
    three workers such a race is lost every time; an executor that orders them gives the same bits
    with or without the delays."""
    from mergekitlite import execute

    merge_chunk, apply_rule = execute.merge_chunk, execute.apply_rule

    def slow_merge(task, *args, **kwargs):
        if task.row_rules:
            time.sleep(2 * DELAY)
        return merge_chunk(task, *args, **kwargs)

    def slow_rule(task, rule, *args, **kwargs):
        if rule.why.startswith("vocab_policy"):
            time.sleep(DELAY)
        return apply_rule(task, rule, *args, **kwargs)

    monkeypatch.setattr(execute, "merge_chunk", slow_merge)
    monkeypatch.setattr(execute, "apply_rule", slow_rule)


def vocab_list(rows: int) -> list[str]:
    """Token texts by id: <unk>, words, the ChatML specials at 60..62, 'hello' at 63, then
    (larger vocabularies) <|tool|> at 64 (special) and 'tool' at 65."""
    words = ["<unk>"] + [f"w{i}" for i in range(1, EOT)] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "hello"]
    words += ["<|tool|>", "tool"]
    return words[:rows]


def write_tokenizer(folder: Path, rows: int = V, chat: bool = False) -> None:
    builders.write_word_tokenizer(folder, vocab_list(rows), chat_template=CHAT_TEMPLATE if chat else None)


def special_ids(rows: int) -> list[int]:
    return [i for i, t in enumerate(vocab_list(rows)) if t.startswith("<")]


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    """base, a (continued pretraining), chat: untied bf16 Llamas, 64-token vocabulary, same tokenizer."""
    root = tmp_path_factory.mktemp("tokrows")
    f = builders.make_family(root, "llama", seed=51)
    out = {"base": f["base"], "a": f["a"], "chat": f["b"]}
    for name, folder in out.items():
        write_tokenizer(folder, chat=name == "chat")
    return out


def extend_vocab(src: Path, dst: Path, rows: int, seed: int) -> Path:
    """A copy of ``src`` with ``rows`` embedding/lm_head rows (seeded new rows) and vocab_size = rows."""
    t = load_tensors(src)
    g = torch.Generator().manual_seed(seed)
    for name in VOCAB_MATRICES:
        extra = torch.randn(rows - t[name].shape[0], t[name].shape[1], generator=g).to(t[name].dtype)
        t[name] = torch.cat([t[name], extra])
    cfg = read_config(src) | {"vocab_size": rows}
    builders.write_safetensors_model(dst, t, cfg)
    write_tokenizer(dst, rows, chat=(src / "tokenizer_config.json").read_text().count("chat_template") > 0)
    return dst


@pytest.fixture(scope="module")
def wide_fam(fam, tmp_path_factory) -> dict[str, Path]:
    """base with 64 rows, a with 65, chat with 66 (two tokens added by fine-tuning)."""
    root = tmp_path_factory.mktemp("tokrows-wide")
    return {
        "base": fam["base"],
        "a": extend_vocab(fam["a"], root / "a65", 65, 1),
        "chat": extend_vocab(fam["chat"], root / "chat66", 66, 2),
    }


def recipe_text(fam: dict[str, Path], tokenizer: str) -> str:
    return (
        "merge_method: task_arithmetic\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {fam['a']}\n    parameters: {{weight: {W['a']}}}\n"
        f"  - model: {fam['chat']}\n    parameters: {{weight: {W['chat']}}}\n"
        "dtype: bfloat16\n" + tokenizer
    )


def merged_reference(fam: dict[str, Path], rows: int | None = None) -> dict[str, torch.Tensor]:
    """The task-arithmetic value of every tensor (vocabulary matrices: their first ``rows`` rows)."""
    base, a, chat = (load_tensors(fam[k]) for k in ("base", "a", "chat"))
    out = {}
    for name, b in base.items():
        ms = [a[name], chat[name]]
        if name in VOCAB_MATRICES and rows is not None:
            b, ms = b[:rows], [m[:rows] for m in ms]
        out[name] = ref_task_arithmetic(b, ms, [W["a"], W["chat"]]).to(torch.bfloat16)
    return out


def merge(tmp_path: Path, fam: dict[str, Path], tokenizer: str, threads: int = 1):
    """The merge, on one chunk worker unless ``threads``: chunks then run in submission order
    (see test_row_rules_are_ordered_with_concurrent_workers for several workers)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(fam, tokenizer))
    result = run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False, threads=threads))
    return load_tensors(tmp_path / "out"), result


def assert_all(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, exp in expected.items():
        assert_bitwise(got[name], exp, name)


def test_per_token_sources(fam, tmp_path):
    """mergekit's rules: a token setting is the row a model that lacks the token takes; with force: true every
    model takes it (so the merge of equal rows gives that row, bit for bit); a setting for a token every model
    has is not used. Unquoted numbers are output ids (mergekitlite), strings are token texts."""
    chat, base, a = (load_tensors(fam[k]) for k in ("chat", "base", "a"))
    tokenizer = (
        "tokenizer:\n"
        f"  source: {fam['chat']}\n"
        "  tokens:\n"
        f'    "<|im_end|>": {{source: {fam["chat"]}, force: true}}\n'
        '    "<|im_start|>": {source: {kind: zero}, force: true}\n'
        f'    63: {{source: {{kind: model_token, model: {fam["base"]}, token: "<|endoftext|>"}}, force: true}}\n'
        f"    5: {{source: {{kind: model_token, model: {fam['a']}, token_id: 9}}, force: true}}\n"
        f"    7: {{source: {fam['base']}, force: true}}\n"
        f'    "w8": {{source: {fam["base"]}}}\n'
        '    "<|endoftext|>": {source: {kind: merge}}\n'
    )
    got, _ = merge(tmp_path, fam, tokenizer)
    expected = merged_reference(fam)
    for name in VOCAB_MATRICES:
        e = expected[name].clone()
        e[IM_END] = chat[name][IM_END]
        e[IM_START] = 0
        e[63] = base[name][EOT]
        e[5] = a[name][9]
        e[7] = base[name][7]
        expected[name] = e  # w8 (every model has it, not forced) and <|endoftext|> stay merged
        assert not torch.equal(got[name][8], base[name][8]), "an unforced setting must not replace a merged row"
    assert_all(got, expected)


def test_a_new_token_joins_the_vocabulary(fam, tmp_path):
    """A token text the vocabulary lacks is added to it (as mergekit does): one more row, set as asked for
    every model (no model has it), and a tokenizer that encodes it."""
    from transformers import AutoTokenizer

    chat = load_tensors(fam["chat"])
    tokenizer = (
        f"tokenizer:\n  source: {fam['chat']}\n  tokens:\n"
        '    "<|nope|>": {source: {kind: zero}}\n'
        f'    "<|tool|>": {{source: {{kind: model_token, model: {fam["chat"]}, token: "<|im_end|>"}}}}\n'
    )
    got, _ = merge(tmp_path, fam, tokenizer)
    expected = merged_reference(fam)
    for name in VOCAB_MATRICES:
        zero = torch.zeros(1, builders.HIDDEN, dtype=torch.bfloat16)
        expected[name] = torch.cat([expected[name], zero, chat[name][IM_END : IM_END + 1]])
    assert_all(got, expected)
    assert read_config(tmp_path / "out")["vocab_size"] == V + 2
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.convert_tokens_to_ids(["<|nope|>", "<|tool|>"]) == [V, V + 1]
    assert tok.encode("w3 <|tool|>", add_special_tokens=False) == [3, V + 1]


@pytest.mark.parametrize("mode", ["take", "zero"])
def test_special_tokens_take_or_zero(fam, tmp_path, mode):
    chat = load_tensors(fam["chat"])
    got, result = merge(tmp_path, fam, f"tokenizer:\n  source: {fam['chat']}\n  special_tokens: {mode}\n")
    expected = merged_reference(fam)
    assert special_ids(V) == list(SPECIAL_IDS)
    for name in VOCAB_MATRICES:
        for i in SPECIAL_IDS:
            expected[name][i] = chat[name][i] if mode == "take" else 0
    assert_all(got, expected)
    assert result.plan.tokenizer_donor == str(fam["chat"])


def test_tokens_override_special_tokens(fam, tmp_path):
    """A per-token setting exempts its token from special_tokens: <|im_start|> (kind: merge) is merged, token 0
    (forced to zero for every model) is zero; the other special tokens are taken from the chat model."""
    chat = load_tensors(fam["chat"])
    tokenizer = (
        f"tokenizer:\n  source: {fam['chat']}\n  special_tokens: take\n"
        '  tokens:\n    "<|im_start|>": {source: {kind: merge}}\n    0: {source: {kind: zero}, force: true}\n'
    )
    got, _ = merge(tmp_path, fam, tokenizer)
    expected = merged_reference(fam)
    for name in VOCAB_MATRICES:
        expected[name][0] = 0
        for i in (EOT, IM_END):
            expected[name][i] = chat[name][i]
    assert_all(got, expected)


GONE = '    "<|im_end|>": {source: {kind: model_token, model: BASE, token: "<|gone|>"}}\n'


@pytest.mark.parametrize(
    ("tokens", "needle"),
    [
        (GONE, "'<|gone|>' is not a token of"),
        ('    "<|brand-new|>": {source: BASE}\n', "'<|brand-new|>' is not a token of"),
        ("    640: {source: {kind: zero}}\n", "640 is not a token of the output vocabulary"),
    ],
)
def test_unknown_token_is_a_clear_error(fam, tmp_path, capsys, tokens, needle):
    tokenizer = f"tokenizer:\n  source: {fam['chat']}\n  tokens:\n" + tokens.replace("BASE", str(fam["base"]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(fam, tokenizer))
    with pytest.raises(PlanError, match="is not a token"):
        run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False))
    code = merge_main([str(recipe), str(tmp_path / "out"), "--no-hash"])
    err = "".join(capsys.readouterr())
    assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("policy", ["keep", "mean", "zero"])
def test_vocab_policies(wide_fam, tmp_path, policy):
    a, chat = load_tensors(wide_fam["a"]), load_tensors(wide_fam["chat"])
    got, result = merge(tmp_path, wide_fam, f"tokenizer:\n  source: {wide_fam['chat']}\n  vocab_policy: {policy}\n")
    expected = merged_reference(wide_fam, rows=V)  # rows 0..63 are in every input: merged
    for name in VOCAB_MATRICES:
        if policy == "keep":
            extra = chat[name][V:66]
        elif policy == "mean":
            row64 = (a[name][64].float() + chat[name][64].float()) / 2  # the two models that have it
            row65 = chat[name][65].float()  # only the chat model has it
            extra = torch.stack([row64, row65]).to(torch.bfloat16)
        else:
            extra = torch.zeros(2, builders.HIDDEN, dtype=torch.bfloat16)
        expected[name] = torch.cat([expected[name], extra])
    assert_all(got, expected)
    assert read_config(tmp_path / "out")["vocab_size"] == 66
    assert any("vocabularies differ" in w for w in result.plan.warnings)


def test_vocab_follows_a_smaller_tokenizer_source(wide_fam, tmp_path):
    """With the 64-token base as tokenizer source the output has 64 rows, all merged."""
    got, _ = merge(tmp_path, wide_fam, "tokenizer_source: base\n")
    assert_all(got, merged_reference(wide_fam, rows=V))
    assert read_config(tmp_path / "out")["vocab_size"] == V


def test_special_tokens_with_a_larger_vocabulary(wide_fam, tmp_path):
    """special_tokens: take covers the added <|tool|> row (64) too; 'tool' (65) follows vocab_policy."""
    chat = load_tensors(wide_fam["chat"])
    tokenizer = f"tokenizer:\n  source: {wide_fam['chat']}\n  special_tokens: take\n  vocab_policy: mean\n"
    got, _ = merge(tmp_path, wide_fam, tokenizer)
    expected = merged_reference(wide_fam, rows=V)
    assert special_ids(66) == [*SPECIAL_IDS, 64]
    for name in VOCAB_MATRICES:
        expected[name] = torch.cat([expected[name], chat[name][V:66]])  # 64 taken, 65: mean of chat alone
        for i in SPECIAL_IDS:
            expected[name][i] = chat[name][i]
    assert_all(got, expected)


def test_larger_vocabulary_output_loads_in_transformers(wide_fam, tmp_path):
    from transformers import AutoModelForCausalLM

    got, _ = merge(tmp_path, wide_fam, f"tokenizer:\n  source: {wide_fam['chat']}\n")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert model.config.vocab_size == 66
    assert_bitwise(model.get_input_embeddings().weight.detach(), got[EMBED], EMBED)
    assert_bitwise(model.get_output_embeddings().weight.detach(), got[HEAD], HEAD)
    with torch.no_grad():
        logits = model(torch.tensor([[IM_START, 64, 65, IM_END]])).logits
    assert logits.shape == (1, 4, 66) and bool(torch.isfinite(logits).all())


@pytest.mark.usefixtures("slow_merge_of_rows_set_by_rules")
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("case", ["rules-after-merge", "token-after-vocab-rule"])
def test_row_rules_are_ordered_with_concurrent_workers(wide_fam, tmp_path, threads, case):
    """Rows set by rules are the rules' rows whatever the number of chunk workers: neither the
    merged rows nor an earlier vocab_policy rule's rows may land after them."""
    a, chat = load_tensors(wide_fam["a"]), load_tensors(wide_fam["chat"])
    if case == "rules-after-merge":  # token rows inside the merged rows 0..63
        tokens = f"  special_tokens: zero\n  tokens:\n    5: {{source: {wide_fam['a']}}}\n"
    else:  # row 64: first set by vocab_policy (mean of a and chat), then by the token rule
        tokens = f"  tokens:\n    64: {{source: {wide_fam['a']}}}\n"
    tokenizer = f"tokenizer:\n  source: {wide_fam['chat']}\n  vocab_policy: mean\n" + tokens
    got, _ = merge(tmp_path, wide_fam, tokenizer, threads=threads)
    expected = merged_reference(wide_fam, rows=V)
    for name in VOCAB_MATRICES:
        expected[name] = torch.cat([expected[name], chat[name][V:66]])  # row 65: the mean of chat alone
        if case == "rules-after-merge":
            expected[name][5] = a[name][5]
            for i in special_ids(66):  # 0, 60, 61, 62 and the added <|tool|> at 64
                expected[name][i] = 0
        else:
            expected[name][64] = a[name][64]
    assert_all(got, expected)
