"""End-of-sequence metadata of a chat-vector merge: the output stops on the union of the donors'
end ids (the tokenizer donor's first), ``merge``/``plan`` warn when the tokenizer donor has no chat
template but another input has one, the model card says where each file came from, and
``mergekitlite inspect`` reports what the output stops on."""

from __future__ import annotations

import json
from pathlib import Path

import builders
import pytest
from builders import read_config

from mergekitlite.cli import main, merge_main

EOT, IM_START, IM_END, EOT_ID = 60, 61, 62, 63  # <|endoftext|>, <|im_start|>, <|im_end|>, <|eot|>
CONFIG_EOS = 2  # make_llama's config eos_token_id (the base's config donor id)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WARNING = "has no chat template"


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


def write_tokenizer(folder: Path, *, chat: bool, generation_eos: int | list[int]) -> None:
    texts = ["<unk>"] + [f"w{i}" for i in range(1, EOT)] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot|>"]
    builders.write_word_tokenizer(folder, texts, chat_template=CHAT_TEMPLATE if chat else None)
    gen = {"bos_token_id": 1, "eos_token_id": generation_eos, "temperature": 0.7 if chat else 1.0, "do_sample": chat}
    (folder / "generation_config.json").write_text(json.dumps(gen))


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    """base: pretrained (no chat template, stops on <|endoftext|> = 60, config eos 2); cpt: its
    continued pretraining; chat: ChatML template (turns end with <|im_end|> = 62), generation
    config stopping on <|eot|> = 63, config eos 62, tokenizer eos <|endoftext|> = 60."""
    root = tmp_path_factory.mktemp("eos")
    f = builders.make_family(root, "llama", seed=61, config_extra={"mklt_donor": "base"})
    cpt = builders.perturb(f["a"], root / "cpt", 62, config_extra={"mklt_donor": "cpt"})
    chat = builders.perturb(f["b"], root / "chat", 63, config_extra={"mklt_donor": "chat", "eos_token_id": IM_END})
    write_tokenizer(f["base"], chat=False, generation_eos=EOT)
    write_tokenizer(cpt, chat=False, generation_eos=EOT)
    write_tokenizer(chat, chat=True, generation_eos=EOT_ID)
    return {"base": f["base"], "cpt": cpt, "chat": chat}


def recipe(tmp_path: Path, fam: dict[str, Path], tokenizer_source: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {fam['cpt']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {fam['chat']}\n    parameters: {{weight: 1.0}}\n"
        "dtype: bfloat16\n"
        f"tokenizer_source: {tokenizer_source}\n"
    )
    return path


def merge(capsys, recipe_path: Path, out: Path) -> str:
    code = merge_main([str(recipe_path), str(out), "--no-hash"])
    text = capsys.readouterr()
    assert code == 0, text.out + text.err
    return text.out + text.err


def as_list(value: int | list[int]) -> list[int]:
    return value if isinstance(value, list) else [value]


def card_origins(out: Path) -> dict[str, str]:
    """The model card's 'Where each file came from' table: {file: from}."""
    lines = (out / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("## Where each file came from")
    table = {}
    for line in lines[start + 1 :]:
        if line.startswith("##"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("file", "---"):
            table[cells[0]] = cells[1].strip("`")
    return table


def test_chat_donor_eos_union_and_card(fam, tmp_path, capsys):
    out = tmp_path / "out"
    text = merge(capsys, recipe(tmp_path, fam, str(fam["chat"])), out)
    assert WARNING not in text

    # The tokenizer donor's end ids (generation config, config, tokenizer eos, chat template's end
    # of turn), then the config donor's (generation config, config), each once.
    chat_ids = [EOT_ID, IM_END, EOT, IM_END]
    base_ids = [EOT, CONFIG_EOS]
    expected = list(dict.fromkeys(chat_ids + base_ids))
    assert expected == [EOT_ID, IM_END, EOT, CONFIG_EOS]  # (what the rule above gives, spelled out)
    gen = json.loads((out / "generation_config.json").read_text())
    assert as_list(gen["eos_token_id"]) == expected
    assert as_list(read_config(out)["eos_token_id"]) == expected
    chat_gen = json.loads((fam["chat"] / "generation_config.json").read_text())
    assert {k: v for k, v in gen.items() if k != "eos_token_id"} == {
        k: v for k, v in chat_gen.items() if k != "eos_token_id"
    }
    assert read_config(out)["mklt_donor"] == "base"

    origins = card_origins(out)
    assert origins["config.json"] == str(fam["base"])
    tokenizer_rows = [k for k in origins if k.startswith("tokenizer (")]
    assert len(tokenizer_rows) == 1 and "tokenizer.json" in tokenizer_rows[0]
    assert origins[tokenizer_rows[0]] == str(fam["chat"])
    assert origins["chat template"] == str(fam["chat"])
    assert origins["generation_config.json"].startswith(f"{fam['chat']};")
    assert str(expected) in origins["generation_config.json"]


def test_base_donor_warns_in_merge_and_plan(fam, tmp_path, capsys):
    path = recipe(tmp_path, fam, "base")
    out = tmp_path / "out"
    text = merge(capsys, path, out)
    assert WARNING in text and str(fam["chat"]) in text and "<|im_end|>" in text
    assert text.index(WARNING) < text.index(str(out)), "the warning should come before the merge's summary"

    assert main(["plan", str(path)]) == 0
    planned = capsys.readouterr().out
    assert WARNING in planned and str(fam["chat"]) in planned and f"tokenizer_source: {fam['chat']}" in planned

    # What the output then stops on: the base's ids only (this is what the warning is about).
    gen = json.loads((out / "generation_config.json").read_text())
    assert as_list(gen["eos_token_id"]) == [EOT, CONFIG_EOS]
    assert as_list(read_config(out)["eos_token_id"]) == [EOT, CONFIG_EOS]
    origins = card_origins(out)
    assert origins["config.json"] == str(fam["base"])
    assert origins[next(k for k in origins if k.startswith("tokenizer ("))] == str(fam["base"])
    assert origins["generation_config.json"].startswith(f"{fam['base']};")
    assert "chat template" not in origins


def test_no_warning_when_the_chat_model_is_the_donor(fam, tmp_path, capsys):
    assert main(["plan", str(recipe(tmp_path, fam, str(fam["chat"])))]) == 0
    assert WARNING not in capsys.readouterr().out


def test_inspect_reports_the_eos_ids(fam, tmp_path, capsys):
    out = tmp_path / "out"
    merge(capsys, recipe(tmp_path, fam, str(fam["chat"])), out)
    expected = [EOT_ID, IM_END, EOT, CONFIG_EOS]
    report = tmp_path / "inspect.json"
    assert main(["inspect", str(out), "--json", str(report)]) == 0
    text = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["generation_eos"] == expected and data["config_eos"] == expected
    assert data["stop_ids"] == expected
    assert data["chat_template"] is True and data["turn_end_tokens"] == ["<|im_end|>"]
    assert data["eos_token"] == "<|endoftext|>"
    assert not any("ends turns with" in f for f in data["flags"]), data["flags"]
    assert str(expected) in text and "ends turns with <|im_end|>" in text

    # The base-donor merge: no chat template, and stops on the base's ids.
    base_out = tmp_path / "base-out"
    merge(capsys, recipe(tmp_path, fam, "base", "b.yaml"), base_out)
    assert main(["inspect", str(base_out), "--json", str(report)]) == 0
    capsys.readouterr()
    data = json.loads(report.read_text())
    assert data["chat_template"] is False and data["stop_ids"] == [EOT, CONFIG_EOS]
