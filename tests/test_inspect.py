"""``mergekitlite inspect``: an untrained-looking special-token row is flagged and a normal one is not;
a chat template whose end-of-turn token generation does not stop on is flagged; row norms and their
statistics match torch computed here over the full matrices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_lm
import torch
from safetensors.torch import save_file

from mergekitlite.cli import main
from mergekitlite.inspect_model import InspectResult, inspect_model
from mergekitlite.sources import index_model

H = 64


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")


def make_model(
    path: Path,
    *,
    seed: int = 0,
    shrink: dict[str, float] | None = None,
    stop_on: tuple[int, ...] = (2, 0),
    chat_template: str | None = tiny_lm.CHATML,
    tied: bool = False,
    pad: int | None = None,
) -> Path:
    """Embedding and lm_head with random rows; the special tokens' rows get a typical norm (√H), then
    ``shrink`` scales the named rows ("embed:<token>" / "head:<token>") to simulate untrained ones."""
    tok = tiny_lm.make_tokenizer()
    vocab = len(tok)
    gen = torch.Generator().manual_seed(seed)
    mats = {"embed": torch.randn(vocab, H, generator=gen), "head": torch.randn(vocab, H, generator=gen)}
    for m in mats.values():
        m[:4] = m[:4] / m[:4].norm(dim=1, keepdim=True) * H**0.5  # ids 0..3 are the special tokens
    for key, factor in (shrink or {}).items():
        which, token = key.split(":", 1)
        mats[which][tok.convert_tokens_to_ids(token)] *= factor
    tensors = {"model.embed_tokens.weight": mats["embed"].to(torch.bfloat16), "model.norm.weight": torch.ones(H)}
    if not tied:
        tensors["lm_head.weight"] = mats["head"].to(torch.bfloat16)
    for i in range(2):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(8, H, generator=gen)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    tok.save_pretrained(path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    if chat_template:
        cfg["chat_template"] = chat_template
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "eos_token_id": 0,
        "tie_word_embeddings": tied,
        "pad_token_id": pad,
    }
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": list(stop_on)}), encoding="utf-8")
    return path


def inspect(path: Path, chunk_elements: int = 1 << 20) -> InspectResult:
    return inspect_model(index_model(str(path), path), chunk_elements)


def test_healthy_model_has_no_flags(tmp_path):
    result = inspect(make_model(tmp_path / "ok"))
    assert result.flags == []
    assert all(not row.untrained for row in result.tokens)
    assert result.chat_template and result.turn_end_tokens == [tiny_lm.IM_END]
    assert result.stop_ids == [2, 0]
    assert result.tensors == 5 and result.layers == 2 and not result.tied_embeddings
    assert result.params_by_dtype == {"bfloat16": 2 * 100 * H, "float32": H + 2 * 8 * H}
    roles = {row.token: row.roles for row in result.tokens}
    assert roles[tiny_lm.IM_END][:2] == ("generation eos", "chat-template end of turn")
    assert "tokenizer eos" in roles[tiny_lm.ENDOFTEXT] and "config eos" in roles[tiny_lm.ENDOFTEXT]


def test_untrained_special_token_row_is_flagged(tmp_path):
    path = make_model(tmp_path / "bad", shrink={f"embed:{tiny_lm.IM_START}": 1e-3})
    result = inspect(path)
    by_token = {row.token: row for row in result.tokens}
    assert by_token[tiny_lm.IM_START].untrained == ("embedding",)  # its lm_head row is fine
    assert all(not row.untrained for t, row in by_token.items() if t != tiny_lm.IM_START)
    assert len(result.flags) == 1
    assert result.flags[0].startswith(
        f"{tiny_lm.IM_START} (id 1, in chat template, special): its embedding row looks untrained (norm 0.008;"
    )


def test_zero_padding_row_is_by_design(tmp_path):
    # nn.Embedding(padding_idx=pad_token_id) keeps that row at zero: not a flag, a note.
    result = inspect(make_model(tmp_path / "pad", pad=0, shrink={f"embed:{tiny_lm.ENDOFTEXT}": 0.0}))
    assert result.flags == []
    row = next(r for r in result.tokens if r.id == 0)
    assert row.embed_norm == 0.0 and row.notes == ("pad row: small by design",) and "config pad" in row.roles


def test_untrained_lm_head_row_of_the_end_token(tmp_path):
    result = inspect(make_model(tmp_path / "head", shrink={f"head:{tiny_lm.IM_END}": 0.3}))
    assert [row.token for row in result.tokens if row.untrained] == [tiny_lm.IM_END]
    assert "its lm_head row looks untrained" in result.flags[0]


def test_norms_and_statistics_match_torch(tmp_path):
    path = make_model(tmp_path / "m", seed=3)
    result = inspect(path, chunk_elements=100)  # one row per read: exercises the chunked pass
    from safetensors.torch import load_file

    embed = load_file(str(path / "model.safetensors"))["model.embed_tokens.weight"].double()
    norms = embed.norm(dim=1)
    st = result.embed_stats
    assert st is not None and st.rows == 100
    assert st.mean == pytest.approx(float(norms.mean()), rel=1e-12)
    assert st.std == pytest.approx(float(norms.std()), rel=1e-12)
    assert st.median == pytest.approx(float(norms.median()), rel=1e-12)
    assert st.threshold == pytest.approx(max(float(norms.mean() - 2 * norms.std()), 0.5 * float(norms.median())))
    for row in result.tokens:
        assert row.embed_norm == pytest.approx(float(norms[row.id]), rel=1e-12)


def test_chat_template_end_token_not_an_eos_is_flagged(tmp_path):
    # The seed's merge: a ChatML chat template, but generation_config.json from the base (eos <|endoftext|> only).
    result = inspect(make_model(tmp_path / "seed", stop_on=(0,)))
    assert result.flags == [
        "the chat template ends turns with <|im_end|> (id 2) but generation stops on eos ids [0]: chat answers will "
        "run to max_new_tokens (add 2 to eos_token_id in generation_config.json)"
    ]
    # No chat template and a trained <|im_end|> (its rows have the others' norm) that is no eos id: the same
    # failure with the base's metadata and no template (mergekit's default), flagged by the trained-end rule.
    no_template = inspect(make_model(tmp_path / "base", stop_on=(0,), chat_template=None))
    assert not no_template.chat_template
    assert no_template.flags == [
        "<|im_end|> (id 2) ends turns and the model can emit it (its lm_head row's norm 8 is like the others': "
        f"mean {no_template.lm_head_stats.mean:.3g}, std {no_template.lm_head_stats.std:.3g}, median "
        f"{no_template.lm_head_stats.median:.3g}), but generation stops on eos ids [0] and there is no chat "
        "template: answers that end with <|im_end|> will run on to max_new_tokens (add 2 to eos_token_id in "
        "generation_config.json, or take tokenizer, chat template and generation_config.json from the chat model: "
        "tokenizer_source)"
    ]
    # Without a template but stopping on <|im_end|>: nothing to flag.
    assert inspect(make_model(tmp_path / "stops", stop_on=(2, 0), chat_template=None)).flags == []


def test_untrained_end_of_turn_token_is_not_called_trained(tmp_path):
    """A base model whose <|im_end|> was never trained (tiny output row) cannot emit it: that row is flagged
    as untrained, not as an end-of-turn token generation misses."""
    result = inspect(make_model(tmp_path / "base", stop_on=(0,), chat_template=None, shrink={"head:<|im_end|>": 1e-3}))
    assert len(result.flags) == 1 and "its lm_head row looks untrained" in result.flags[0]


def test_end_of_turn_words():
    from mergekitlite.inspect_model import reads_as_end_of_turn

    ends = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>", "<|end_of_text|>"]
    assert all(reads_as_end_of_turn(t) for t in ends)
    others = ["<|im_start|>", "<|end_header_id|>", "<|start_header_id|>", "<s>", "[INST]", "<|endofprompt|>"]
    assert not any(reads_as_end_of_turn(t) for t in others)


def test_tied_embeddings(tmp_path):
    result = inspect(make_model(tmp_path / "tied", tied=True))
    assert result.tied_embeddings and result.lm_head_stats is None and result.lm_head_tensor is None
    assert all(row.lm_head_norm is None for row in result.tokens)


def test_cli_exit_codes(tmp_path, capsys):
    ok = make_model(tmp_path / "ok")
    bad = make_model(tmp_path / "bad", stop_on=(0,), shrink={f"embed:{tiny_lm.IM_END}": 0.0})
    assert main(["inspect", str(ok)]) == 0
    assert "no flags" in capsys.readouterr().out
    assert main(["inspect", str(bad)]) == 0  # a report: flags do not fail the command...
    out = capsys.readouterr().out
    assert "2 flag(s)" in out and "looks untrained" in out
    js = tmp_path / "r.json"
    assert main(["inspect", str(bad), "--strict", "--json", str(js), "-q"]) == 1  # ...unless --strict
    assert len(json.loads(js.read_text(encoding="utf-8"))["flags"]) == 2
    assert main(["inspect", str(ok), "--strict"]) == 0


def test_cli_missing_model(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
