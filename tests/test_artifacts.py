"""Everything in the output besides the weights: config, tokenizer, chat template, generation
config, model card, the recipe copy and the provenance file with input digests."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import builders
import pytest
from builders import read_config

from mergekitlite import MergeOptions, run_merge

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def chat_family(tmp_path_factory) -> dict[str, Path]:
    """A pretrained base (plain tokenizer, eos '</s>' = 2) and two children; 'chat' has a chat
    template, eos '<|im_end|>' (= 3) in its tokenizer and generation config, and its own config marker."""
    root = tmp_path_factory.mktemp("chat")
    fam = builders.make_family(root, "llama", seed=11, config_extra={"mklt_donor": "base"})
    builders.make_tokenizer(fam["base"], eos="</s>", generation_eos_id=2, words=("base",))
    cpt = builders.perturb(fam["a"], root / "cpt", 12, config_extra={"mklt_donor": "cpt"})
    chat = builders.perturb(fam["b"], root / "chat", 13, config_extra={"mklt_donor": "chat", "eos_token_id": 3})
    builders.make_tokenizer(chat, chat_template=CHAT_TEMPLATE, eos="<|im_end|>", generation_eos_id=3, words=("chat",))
    return {"base": fam["base"], "cpt": cpt, "chat": chat}


def chat_vector_recipe(fam: dict[str, Path], extra: str = "") -> str:
    return (
        "# chat vector: continued pretraining + (chat - base)\n"
        "merge_method: task_arithmetic\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {fam['cpt']}\n    parameters:\n      weight: 1.0\n"
        f"  - model: {fam['chat']}\n    parameters:\n      weight: 1.0\n"
        "dtype: bfloat16\n" + extra
    )


@pytest.fixture(scope="module")
def chat_merge(chat_family, tmp_path_factory) -> tuple[Path, Path, object]:
    """The chat-vector merge with ``tokenizer_source: chat`` (one merge shared by several tests)."""
    root = tmp_path_factory.mktemp("chat-merge")
    recipe = root / "chat-vector.yaml"
    recipe.write_text(chat_vector_recipe(chat_family, f"tokenizer_source: {chat_family['chat']}\n"), encoding="utf-8")
    result = run_merge(recipe, root / "out", MergeOptions(cache_dir=root / "cache"))
    return recipe, root / "out", result


def test_tokenizer_chat_template_and_generation_config_come_from_tokenizer_source(chat_family, chat_merge):
    from transformers import AutoTokenizer

    _, out, result = chat_merge
    chat = chat_family["chat"]
    assert result.plan.tokenizer_donor == str(chat)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (chat / name).read_bytes(), name
    # generation_config.json is the chat model's; its end ids lead with the chat model's <|im_end|>
    # (the union with the other donors' end ids is allowed: stopping on those too is harmless).
    gen = json.loads((out / "generation_config.json").read_text())
    chat_gen = json.loads((chat / "generation_config.json").read_text())
    eos = gen.pop("eos_token_id")
    assert (eos if isinstance(eos, list) else [eos])[0] == 3
    assert gen == {k: v for k, v in chat_gen.items() if k != "eos_token_id"}
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 3
    assert "chat" in tok.get_vocab() and "base" not in tok.get_vocab()

    # config.json is the base model's (its marker), with the shipped end-of-sequence id and the output dtype.
    cfg = read_config(out)
    base_cfg = read_config(chat_family["base"])
    assert cfg["mklt_donor"] == "base"
    assert cfg["eos_token_id"] == eos
    assert cfg["dtype"] == "bfloat16"
    assert {k: v for k, v in cfg.items() if k not in ("eos_token_id", "dtype")} == {
        k: v for k, v in base_cfg.items() if k not in ("eos_token_id", "dtype")
    }


def test_default_donor_is_the_base(chat_family, tmp_path):
    from transformers import AutoTokenizer

    recipe = tmp_path / "r.yaml"
    recipe.write_text(chat_vector_recipe(chat_family))
    run_merge(recipe, tmp_path / "out")
    base = chat_family["base"]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == 2
    assert read_config(tmp_path / "out")["eos_token_id"] == 2
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template is None and tok.eos_token == "</s>"


def test_tokenizer_source_base_keyword(chat_family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(chat_vector_recipe(chat_family, "tokenizer_source: base\n"))
    result = run_merge(recipe, tmp_path / "out")
    assert result.plan.tokenizer_donor == str(chat_family["base"])
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (chat_family["base"] / "tokenizer.json").read_bytes()


CHATML_RENDERED = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("source", ["base", "chat"])
def test_builtin_chatml_template(chat_family, tmp_path, source):
    """``chat_template: chatml`` ships the built-in template, whatever the donor had."""
    from transformers import AutoTokenizer

    recipe = tmp_path / "r.yaml"
    extra = f"tokenizer_source: {chat_family[source]}\nchat_template: chatml\n"
    recipe.write_text(chat_vector_recipe(chat_family, extra))
    run_merge(recipe, tmp_path / "out")
    builtin = (resources.files("mergekitlite") / "templates" / "chatml.jinja").read_text(encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template.strip() == builtin.strip()
    messages = [{"role": "user", "content": "hello"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == CHATML_RENDERED


def test_literal_and_auto_chat_template(chat_family, tmp_path):
    from transformers import AutoTokenizer

    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(chat_vector_recipe(chat_family, f"chat_template: {json.dumps(literal)}\n"))
    run_merge(recipe, tmp_path / "lit")
    tok = AutoTokenizer.from_pretrained(tmp_path / "lit")
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "[user] hello\n"

    # 'auto': the template the inputs carry (only the chat model has one), even with the base as donor.
    recipe.write_text(chat_vector_recipe(chat_family, "chat_template: auto\n"))
    run_merge(recipe, tmp_path / "auto")
    tok = AutoTokenizer.from_pretrained(tmp_path / "auto")
    assert tok.chat_template.strip() == CHAT_TEMPLATE


def _input_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def test_recipe_is_copied_verbatim(chat_merge):
    """mergekit_config.yml is the recipe file as written, comments included."""
    recipe, out, _ = chat_merge
    assert (out / "mergekit_config.yml").read_text(encoding="utf-8") == recipe.read_text(encoding="utf-8")


def test_model_card_has_recipe_and_input_digests(chat_family, chat_merge):
    recipe, out, _ = chat_merge
    card = (out / "README.md").read_text(encoding="utf-8")
    assert recipe.read_text(encoding="utf-8").strip() in card
    assert "task_arithmetic" in card
    for ref, folder in chat_family.items():
        assert str(folder) in card, ref
        for f in _input_files(folder):
            assert sha256(f) in card, f"README.md lacks the sha256 of {ref}/{f.name}"


def test_provenance_file(chat_family, chat_merge):
    recipe, out, _ = chat_merge
    prov = json.loads((out / "mergekitlite.json").read_text(encoding="utf-8"))
    assert prov["merge_method"] == "task_arithmetic"
    assert prov["recipe_sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()
    assert prov["tokenizer_donor"] == str(chat_family["chat"])
    assert prov["config_donor"] == str(chat_family["base"])
    assert set(prov["inputs"]) == {str(p) for p in chat_family.values()}
    for folder in chat_family.values():
        entry = prov["inputs"][str(folder)]
        assert Path(entry["path"]) == folder.resolve()
        assert entry["from_hub"] is False
        assert entry["files"] == {f.name: sha256(f) for f in _input_files(folder)}


def test_hash_cache_lives_in_mergekitlite_cache_and_notices_changes(tmp_path, monkeypatch):
    """The input-hash cache goes to $MERGEKITLITE_CACHE; a file changed in place gets a fresh digest."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MERGEKITLITE_CACHE", str(cache))
    fam = builders.make_family(tmp_path / "fam", "gpt2", seed=21, layers=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {fam['a']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {fam['b']}\n    parameters: {{weight: 1.0}}\n"
    )
    run_merge(recipe, tmp_path / "out1")
    assert any(cache.iterdir()), "no hash cache written to MERGEKITLITE_CACHE"
    # Same size, new content and a new mtime.
    cfg_path = fam["a"] / "config.json"
    data = cfg_path.read_text()
    cfg_path.write_text(data.replace('"n_head": 2', '"n_head":2 '))
    assert len(cfg_path.read_text()) == len(data) and cfg_path.read_text() != data
    run_merge(recipe, tmp_path / "out2")
    prov = json.loads((tmp_path / "out2" / "mergekitlite.json").read_text())
    assert prov["inputs"][str(fam["a"])]["files"]["config.json"] == sha256(cfg_path)


def test_no_hash_option(chat_family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(chat_vector_recipe(chat_family))
    run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False))
    prov = json.loads((tmp_path / "out" / "mergekitlite.json").read_text())
    assert all(entry["files"] == {} for entry in prov["inputs"].values())
    assert (tmp_path / "out" / "README.md").is_file()
