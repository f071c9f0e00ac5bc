"""What a model folder says about its special tokens, read from its JSON files alone.

No tokenizer is instantiated (that can need remote code, as Qwen-14B's does): token ids come from
``tokenizer.json``'s added tokens and vocabulary or ``tokenizer_config.json``'s
``added_tokens_decoder``; end-of-sequence ids from ``generation_config.json`` and ``config.json``;
the end-of-turn token from the chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

# Spellings of end-of-turn / end-of-text tokens across model families.
_END_HINTS = ("end", "eot", "eos", "</s>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def as_ids(value: Any) -> list[int]:
    """An eos setting (int, list of ints, or None) as a list."""
    if value is None:
        return []
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int)]
    return [int(value)] if isinstance(value, int) else []


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


@dataclass
class TokenInfo:
    """Special-token facts of one model folder."""

    folder: Path
    ids: dict[str, int] = field(default_factory=dict)  # special/added token text → id
    special: set[str] = field(default_factory=set)
    eos_token: str | None = None
    generation_eos: list[int] = field(default_factory=list)
    config_eos: list[int] = field(default_factory=list)
    chat_template: str | None = None

    def id_of(self, token: str) -> int | None:
        return self.ids.get(token)

    def turn_end_tokens(self) -> list[str]:
        """Special tokens the chat template writes that read as an end of turn/text."""
        if not self.chat_template:
            return []
        found = [t for t in self.ids if t in self.chat_template and t in self.special]
        return [t for t in found if any(h in t.lower() for h in _END_HINTS)]

    def end_ids(self) -> list[int]:
        """Every id this model treats as 'stop': generation config, config, tokenizer eos, template end."""
        ids = list(self.generation_eos) + list(self.config_eos)
        if self.eos_token and self.eos_token in self.ids:
            ids.append(self.ids[self.eos_token])
        ids += [self.ids[t] for t in self.turn_end_tokens()]
        return list(dict.fromkeys(ids))


def builtin_chat_templates() -> list[str]:
    """Names of the chat templates shipped in ``mergekitlite/templates/``: mergekit's names
    (alpaca, chatml, exaone, llama3, mistral), each written from its model family's documented format."""
    folder = resources.files("mergekitlite") / "templates"
    return sorted(p.name.removesuffix(".jinja") for p in folder.iterdir() if p.name.endswith(".jinja"))


def builtin_chat_template(name: str) -> str | None:
    """The shipped chat template called ``name`` (``chat_template: llama3``), or None. Its text is
    the file's without the newline that ends the file (a template ends where its last tag does)."""
    if name not in builtin_chat_templates():
        return None
    path = resources.files("mergekitlite") / "templates" / f"{name}.jinja"
    return path.read_text(encoding="utf-8").removesuffix("\n")


def chat_template_of(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tmpl = (read_json_object(folder / "chat_template.json") or {}).get("chat_template")
    if tmpl is None:
        tmpl = (read_json_object(folder / "tokenizer_config.json") or {}).get("chat_template")
    if isinstance(tmpl, list):  # named templates: the default one
        tmpl = next((t.get("template") for t in tmpl if isinstance(t, dict) and t.get("name") == "default"), None)
    return tmpl if isinstance(tmpl, str) else None


def read_token_info(folder: Path) -> TokenInfo:
    info = TokenInfo(folder)
    tok = read_json_object(folder / "tokenizer.json") or {}
    for entry in tok.get("added_tokens") or []:
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and isinstance(entry.get("id"), int):
            info.ids[entry["content"]] = entry["id"]
            if entry.get("special"):
                info.special.add(entry["content"])
    cfg = read_json_object(folder / "tokenizer_config.json") or {}
    for key, entry in (cfg.get("added_tokens_decoder") or {}).items():
        text = _token_text(entry)
        if text is not None and str(key).isdigit():
            info.ids.setdefault(text, int(key))
            if isinstance(entry, dict) and entry.get("special"):
                info.special.add(text)
    special_map = read_json_object(folder / "special_tokens_map.json") or {}
    info.eos_token = _token_text(cfg.get("eos_token")) or _token_text(special_map.get("eos_token"))
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and info.eos_token and info.eos_token not in info.ids and info.eos_token in vocab:
        info.ids[info.eos_token] = int(vocab[info.eos_token])
    for extra in cfg.get("additional_special_tokens") or []:
        text = _token_text(extra)
        if text:
            info.special.add(text)
    if info.eos_token:
        info.special.add(info.eos_token)
    gen = read_json_object(folder / "generation_config.json") or {}
    info.generation_eos = as_ids(gen.get("eos_token_id"))
    for stop in gen.get("stop_words_ids") or []:  # Qwen v1's generation config
        if isinstance(stop, list) and len(stop) == 1 and isinstance(stop[0], int):
            info.generation_eos.append(stop[0])
    info.config_eos = as_ids((read_json_object(folder / "config.json") or {}).get("eos_token_id"))
    info.chat_template = chat_template_of(folder)
    return info
