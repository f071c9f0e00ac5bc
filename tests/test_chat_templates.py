"""The chat templates shipped under mergekitlite/templates/ (``chat_template: NAME``): mergekit's
names, each rendering its model family's documented prompt format. Each is rendered through
transformers' ``apply_chat_template`` (its sandboxed Jinja with trim_blocks/lstrip_blocks) and
through plain jinja2 (no whitespace options): both must give the expected text written here."""

from __future__ import annotations

import json
from pathlib import Path

import builders
import jinja2
import pytest

from mergekitlite import MergeOptions, parse_recipe, run_merge
from mergekitlite.errors import RecipeError
from mergekitlite.tokens import builtin_chat_template, builtin_chat_templates

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a colour."},
]

# name -> (bos, eos, expected rendering of CONVERSATION with the generation prompt)
EXPECTED = {
    "chatml": (
        "<s>",
        "</s>",
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    "llama3": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "mistral": ("<s>", "</s>", "<s>[INST] You are terse.\n\nHi! [/INST] Hello.</s>[INST] Name a colour. [/INST]"),
    "alpaca": (
        "<s>",
        "</s>",
        "You are terse.\n\n"
        "### Instruction:\nHi!\n\n"
        "### Response:\nHello.\n\n"
        "### Instruction:\nName a colour.\n\n"
        "### Response:\n",
    ),
    "exaone": (
        "[BOS]",
        "[|endofturn|]",
        "[|system|]You are terse.[|endofturn|]\n"
        "[|user|]Hi!\n"
        "[|assistant|]Hello.[|endofturn|]\n"
        "[|user|]Name a colour.\n"
        "[|assistant|]",
    ),
}

# Without a system message, where the format says something about it.
EXPECTED_NO_SYSTEM = {
    "mistral": "<s>[INST] Hi! [/INST] Hello.</s>[INST] Name a colour. [/INST]",
    "exaone": "[|system|][|endofturn|]\n[|user|]Hi!\n[|assistant|]Hello.[|endofturn|]\n[|user|]Name a colour.\n"
    "[|assistant|]",
    "alpaca": "### Instruction:\nHi!\n\n### Response:\nHello.\n\n### Instruction:\nName a colour.\n\n### Response:\n",
}


def tokenizer(bos: str, eos: str):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, bos: 1, eos: 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
    )


def render_transformers(name: str, messages: list[dict[str, str]]) -> str:
    bos, eos, _ = EXPECTED[name]
    return tokenizer(bos, eos).apply_chat_template(
        messages, chat_template=builtin_chat_template(name), tokenize=False, add_generation_prompt=True
    )


def render_jinja2(name: str, messages: list[dict[str, str]]) -> str:
    bos, eos, _ = EXPECTED[name]
    template = jinja2.Environment().from_string(builtin_chat_template(name))
    return template.render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)


def test_the_names_are_mergekits():
    assert builtin_chat_templates() == sorted(EXPECTED) == ["alpaca", "chatml", "exaone", "llama3", "mistral"]


@pytest.mark.parametrize("render", [render_transformers, render_jinja2], ids=["transformers", "jinja2"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_template_renders_its_documented_format(name, render):
    assert render(name, CONVERSATION) == EXPECTED[name][2]
    if name in EXPECTED_NO_SYSTEM:
        assert render(name, CONVERSATION[1:]) == EXPECTED_NO_SYSTEM[name]


def test_without_generation_prompt_the_conversation_ends_with_the_last_turn():
    bos, eos, _ = EXPECTED["llama3"]
    text = tokenizer(bos, eos).apply_chat_template(
        CONVERSATION[:3], chat_template=builtin_chat_template("llama3"), tokenize=False, add_generation_prompt=False
    )
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>")


def test_mistral_refuses_roles_that_do_not_alternate():
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="roles must alternate user/assistant"):
        render_transformers("mistral", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_the_chatml_text_is_the_one_the_demo_models_ship():
    """One ChatML text in the code base: the built-in one, which the demo's chat model was trained with."""
    config = Path(__file__).resolve().parent.parent / "demo" / "models" / "chat" / "tokenizer_config.json"
    shipped = json.loads(config.read_text(encoding="utf-8"))["chat_template"]
    assert shipped == builtin_chat_template("chatml")


@pytest.mark.parametrize("name", ["../tokens", "templates/chatml", "ChatML", ""])
def test_only_shipped_names_are_templates(name):
    assert builtin_chat_template(name) is None


def test_an_unknown_name_is_an_error_listing_the_known_ones():
    text = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\nchat_template: llama-3\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, source="r.yaml")
    assert info.value.problems == [
        "r.yaml:5:16: chat_template: unknown chat template 'llama-3'; the built-in ones are alpaca, chatml, exaone, "
        "llama3, mistral ('auto' takes the inputs' most common template; a Jinja template is used as written)"
    ]


@pytest.mark.parametrize("value", [*sorted(EXPECTED), "auto", "'{{ messages }}'"])
def test_names_auto_and_jinja_validate(value):
    text = f"merge_method: linear\nmodels:\n  - model: a\n    parameters: {{weight: 1}}\nchat_template: {value}\n"
    assert parse_recipe(text).warnings == ()


def test_a_merge_ships_the_named_template(tmp_path):
    fam = builders.make_family(tmp_path / "fam", "llama", seed=21, children=1)
    builders.make_tokenizer(fam["base"], eos="</s>")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {fam['base']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {fam['a']}\n    parameters: {{weight: 0.5}}\ndtype: float32\nchat_template: llama3\n"
    )
    run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == builtin_chat_template("llama3")
    rendered = tok.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert rendered == (  # the tokenizer's own bos: <s>
        "<s><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
