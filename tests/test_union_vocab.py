"""Vocabularies that really differ: rows are found by token text (mergekit's rules), ``tokenizer_source: union``
builds the union, ``pad_to_multiple_of`` pads with each input's mean row, and the output's tokenizer encodes
every token of the union. Each output row is compared bitwise with the row computed here from the inputs'
rows, looked up by token text independently of the package."""

from __future__ import annotations

from pathlib import Path

import builders
import pytest
import torch
from builders import assert_bitwise, load_tensors, read_config, ref_task_arithmetic

from mergekitlite import MergeOptions, run_merge
from mergekitlite.cli import merge_main
from mergekitlite.rounding import narrow_once

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
V = builders.VOCAB  # 64 rows in the base
W = {"a": 0.7, "chat": 1.0}
BASE_TOKENS = ["<unk>"] + [f"w{i}" for i in range(1, 60)] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "hello"]


def permuted(tokens: list[str]) -> list[str]:
    """Model a's order of the base tokens: w1 and w2 swapped, 'hello' moved to row 10 (w10 to 63)."""
    out = list(tokens)
    out[1], out[2] = out[2], out[1]
    out[10], out[63] = out[63], out[10]
    return out


VOCABS = {
    "base": BASE_TOKENS,
    "a": [*permuted(BASE_TOKENS), "alpha", "<|tool|>"],
    "chat": [*BASE_TOKENS, "<|tool|>", "beta"],
}


def with_rows(src: Path, dst: Path, rows: int, seed: int) -> Path:
    t = load_tensors(src)
    g = torch.Generator().manual_seed(seed)
    for name in (EMBED, HEAD):
        extra = torch.randn(rows - t[name].shape[0], t[name].shape[1], generator=g).to(t[name].dtype)
        t[name] = torch.cat([t[name], extra])
    builders.write_safetensors_model(dst, t, read_config(src) | {"vocab_size": rows})
    return dst


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("union")
    f = builders.make_family(root, "llama", seed=71)
    out = {
        "base": f["base"],
        "a": with_rows(f["a"], root / "a66", 66, 1),
        "chat": with_rows(f["b"], root / "c66", 66, 2),
    }
    for name, folder in out.items():
        builders.write_word_tokenizer(folder, VOCABS[name])
    return out


def recipe(tmp_path: Path, fam: dict[str, Path], tokenizer: str, method: str = "task_arithmetic") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(
        f"merge_method: {method}\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {fam['a']}\n    parameters: {{weight: {W['a']}}}\n"
        f"  - model: {fam['chat']}\n    parameters: {{weight: {W['chat']}}}\n"
        "dtype: bfloat16\n" + tokenizer
    )
    return p


def rows_by_token(fam: dict[str, Path], name: str, vocab: list[str]) -> dict[str, torch.Tensor]:
    """Each model's rows in the order of ``vocab`` with mergekit's defaults for tokens it lacks: the one model
    that has it, else the base's row, else the mean of those that have it (float64, rounded once)."""
    t = {m: load_tensors(fam[m])[name] for m in ("base", "a", "chat")}
    ids = {m: {tok: i for i, tok in enumerate(VOCABS[m])} for m in t}
    out = {m: torch.empty(len(vocab), t[m].shape[1], dtype=t[m].dtype) for m in t}
    for r, tok in enumerate(vocab):
        have = [m for m in ("a", "chat", "base") if tok in ids[m]]
        if len(have) == 1:
            default = t[have[0]][ids[have[0]][tok]]
        elif "base" in have:
            default = t["base"][ids["base"][tok]]
        else:
            mean = sum(t[m][ids[m][tok]].double() for m in have) / len(have)
            default = narrow_once(mean, torch.bfloat16)
        for m in t:
            out[m][r] = t[m][ids[m][tok]] if tok in ids[m] else default
    return out


def expected_rows(fam: dict[str, Path], name: str, vocab: list[str]) -> torch.Tensor:
    r = rows_by_token(fam, name, vocab)
    return ref_task_arithmetic(r["base"], [r["a"], r["chat"]], [W["a"], W["chat"]]).to(torch.bfloat16)


UNION = [*BASE_TOKENS, "alpha", "beta", "<|tool|>"]  # plain tokens first, in model order, then special ones


def test_union_vocabulary_rows_and_tokenizer(fam, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    result = run_merge(recipe(tmp_path, fam, "tokenizer_source: union\n"), out, MergeOptions(hash_inputs=False))
    got = load_tensors(out)
    for name in (EMBED, HEAD):
        assert_bitwise(got[name], expected_rows(fam, name, UNION), name)
    # every other tensor is the plain merge
    base, a, chat = (load_tensors(fam[m]) for m in ("base", "a", "chat"))
    for name, value in got.items():
        if name not in (EMBED, HEAD):
            ref = ref_task_arithmetic(base[name], [a[name], chat[name]], [W["a"], W["chat"]]).to(torch.bfloat16)
            assert_bitwise(value, ref, name)
    assert read_config(out)["vocab_size"] == len(UNION)
    tok = AutoTokenizer.from_pretrained(out)
    assert [tok.convert_ids_to_tokens(i) for i in range(len(UNION))] == UNION
    assert tok.encode("alpha w3 beta <|tool|> hello", add_special_tokens=False) == [64, 3, 65, 66, 63]
    _model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert result.plan.vocab.source == "union"


def test_tokenizer_source_maps_rows_by_token_text(fam, tmp_path):
    """tokenizer_source: a model — its vocabulary, every input's rows found by token text: a's swapped rows are
    read from where a keeps them, tokens a model lacks get mergekit's defaults."""
    out = tmp_path / "out"
    run_merge(recipe(tmp_path, fam, f"tokenizer_source: {fam['chat']}\n"), out, MergeOptions(hash_inputs=False))
    got = load_tensors(out)
    for name in (EMBED, HEAD):
        assert_bitwise(got[name], expected_rows(fam, name, VOCABS["chat"]), name)


def test_pad_to_multiple_of_pads_with_each_inputs_mean(fam, tmp_path):
    out = tmp_path / "out"
    tokenizer = "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n"
    run_merge(recipe(tmp_path, fam, tokenizer), out, MergeOptions(hash_inputs=False))
    got = load_tensors(out)
    assert read_config(out)["vocab_size"] == 72
    for name in (EMBED, HEAD):
        r = rows_by_token(fam, name, UNION)
        means = {m: narrow_once(v.double().mean(dim=0), torch.bfloat16) for m, v in r.items()}
        pad = ref_task_arithmetic(means["base"], [means["a"], means["chat"]], [W["a"], W["chat"]])
        expected = torch.cat([expected_rows(fam, name, UNION), pad.to(torch.bfloat16).expand(72 - 67, -1)])
        assert_bitwise(got[name], expected, name)


def test_empty_tokenizer_block_is_a_union(fam, tmp_path):
    """``tokenizer: {}`` is mergekit's default tokenizer configuration: source union."""
    out = tmp_path / "out"
    run_merge(recipe(tmp_path, fam, "tokenizer: {}\n"), out, MergeOptions(hash_inputs=False))
    assert load_tensors(out)[EMBED].shape[0] == len(UNION)


def test_union_with_ties_and_threads_is_chunking_independent(fam, tmp_path):
    """Gathered rows go through statistic passes too: the same bits with one worker and small chunks as
    with several workers."""
    r = recipe(
        tmp_path,
        fam,
        "tokenizer_source: union\nparameters: {density: 0.5}\n",
        method="ties",
    )
    run_merge(r, tmp_path / "one", MergeOptions(hash_inputs=False, threads=1, max_ram=400 * 1000**2 + 200_000))
    run_merge(r, tmp_path / "two", MergeOptions(hash_inputs=False, threads=2))
    one, two = load_tensors(tmp_path / "one"), load_tensors(tmp_path / "two")
    for name in one:
        assert_bitwise(one[name], two[name], name)


def _without_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_a_model_without_a_tokenizer_follows_the_base_vocabulary(fam, tmp_path):
    """As in mergekit: a model whose tokenizer cannot be read is taken to have the base's vocabulary (a warning
    says so); its rows are read by the base's token ids."""
    bare = _without_tokenizer(fam["a"], tmp_path / "bare")
    r = recipe(tmp_path, dict(fam, a=bare), "tokenizer_source: union\n")
    result = run_merge(r, tmp_path / "out", MergeOptions(hash_inputs=False))
    assert any(str(bare) in w and "follow the vocabulary" in w for w in result.plan.warnings)
    got = load_tensors(tmp_path / "out")
    # a's rows follow the base's ids, so the union is the base's tokens plus chat's
    assert got[EMBED].shape[0] == len(BASE_TOKENS) + 2


def test_an_unreadable_tokenizer_source_is_a_clear_error(fam, tmp_path, capsys):
    """The vocabulary the output gets must be readable: exit 2 naming the model, nothing written."""
    bare = _without_tokenizer(fam["chat"], tmp_path / "bare")
    r = recipe(tmp_path, dict(fam, chat=bare), f"tokenizer_source: {bare}\n")
    code = merge_main([str(r), str(tmp_path / "out"), "--no-hash"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(bare) in err and "tokenizer" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
