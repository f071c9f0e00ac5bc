"""The prompt set and how prompts become token ids: the chat template that renders them, the end-of-turn
token whose probability is measured after each reference answer."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mergekitlite.errors import MergekitliteError
from mergekitlite.sources import resolve_model_path
from mergekitlite.tokens import TokenInfo, read_token_info


def default_prompts() -> Path:
    """The Japanese + English prompt set shipped with the package."""
    return Path(str(resources.files("mergekitlite").joinpath("data/prompts_ja_en.yaml")))


@dataclass(frozen=True)
class PromptCase:
    prompt: str
    reference: str | None = None


def load_prompts(path: Path) -> list[PromptCase]:
    """A YAML list of ``{prompt, reference}`` mappings; every problem is reported at once."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergekitliteError(f"--prompts {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise MergekitliteError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, list) or not data:
        raise MergekitliteError(f"{path}: expected a non-empty list of {{prompt: ..., reference: ...}} entries")
    problems, cases = [], []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            problems.append(f"{path}: item {i}: expected a mapping with 'prompt' and 'reference'")
            continue
        unknown = set(item) - {"prompt", "reference"}
        if unknown:
            problems.append(f"{path}: item {i}: unknown key(s) {sorted(unknown)} (expected prompt, reference)")
        prompt, reference = item.get("prompt"), item.get("reference")
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{path}: item {i}: 'prompt' must be a non-empty string")
        if reference is not None and not isinstance(reference, str):
            problems.append(f"{path}: item {i}: 'reference' must be a string")
        cases.append(PromptCase(str(prompt), reference if isinstance(reference, str) else None))
    if problems:
        raise MergekitliteError("\n".join(problems))
    return cases


@dataclass(frozen=True)
class PreparedPrompt:
    prompt: str
    reference: str | None
    prompt_ids: tuple[int, ...]  # the rendered user turn + assistant header
    answer_ids: tuple[int, ...]  # the reference answer (empty without one)


def prepare_prompts(tokenizer: Any, template: str | None, cases: Sequence[PromptCase]) -> tuple[PreparedPrompt, ...]:
    out = []
    for case in cases:
        answer = tokenizer(case.reference, add_special_tokens=False)["input_ids"] if case.reference else []
        out.append(
            PreparedPrompt(
                case.prompt, case.reference, tuple(render_prompt(tokenizer, template, case.prompt)), tuple(answer)
            )
        )
    return tuple(out)


def render_prompt(tokenizer: Any, template: str | None, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn followed by the assistant header (plain text + newline
    without a template)."""
    if template is None:
        return list(tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"])
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except TemplateError as exc:
        raise MergekitliteError(f"the chat template cannot render a user turn: {exc}") from None
    # The template writes any BOS itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _templates_dir() -> Path:
    return Path(str(resources.files("mergekitlite").joinpath("templates")))


def choose_chat_template(explicit: str | None, models: Sequence[tuple[str, Path]]) -> tuple[str | None, str]:
    """(template, where it came from). ``explicit`` is a model (folder or hub id), a .jinja file or
    the name of a built-in template; by default the merged model's own (``models[0]``), else the first
    other model that has one."""
    if explicit:
        as_file = Path(explicit).expanduser()
        if as_file.is_file():
            return as_file.read_text(encoding="utf-8"), f"file {as_file}"
        builtin = _templates_dir() / f"{explicit}.jinja"
        if not as_file.exists() and builtin.is_file():
            return builtin.read_text(encoding="utf-8"), f"built-in template {explicit!r}"
        path, _ = resolve_model_path(explicit)
        template = read_token_info(path).chat_template
        if template is None:
            raise MergekitliteError(f"--chat-template-from {explicit}: {path} has no chat template")
        return template, f"{explicit} (--chat-template-from)"
    for i, (name, path) in enumerate(models):
        template = read_token_info(path).chat_template
        if template is not None:
            return template, name + (" (the merged model's own)" if i == 0 else " (the merged model has none)")
    return None, "none of the models has one: prompts are fed as plain text"


def _looks_special(token: str) -> bool:
    return (token.startswith("<") and token.endswith(">")) or (token.startswith("[") and token.endswith("]"))


def end_token_of(tokens: TokenInfo, template: str | None, tokenizer: Any, stops: Sequence[int]) -> tuple[str, int]:
    """The token whose probability is measured after each answer: the chat template's end-of-turn
    token (the first it writes), else the tokenizer's eos, else the merged model's first stop id.

    The template's special tokens are looked up in the loaded tokenizer too: tokenizers without a
    tokenizer.json (Qwen-14B's tiktoken) list them nowhere in their JSON files.
    """
    if template:
        marked = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()) | tokens.special
        literal = {
            t: i
            for t, i in tokenizer.get_vocab().items()
            if isinstance(t, str) and len(t) > 1 and t in template and (t in marked or _looks_special(t))
        }
        found = dataclasses.replace(
            tokens, ids={**literal, **tokens.ids}, special=tokens.special | set(literal), chat_template=template
        )
        ends = found.turn_end_tokens()
        if ends:
            first = min(ends, key=template.index)
            return first, found.ids[first]
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token, int(tokenizer.eos_token_id)
    if stops:
        return str(tokenizer.convert_ids_to_tokens(stops[0])), stops[0]
    raise MergekitliteError(
        "the merged model has no end token: no chat-template end of turn, no tokenizer eos and no "
        "eos id in generation_config.json or config.json"
    )
