"""Our question/answer task format: JSONL, one ``{"question": ..., "answer": ..., "aliases": [...]}`` per line.

An answer matches when, after case folding and collapsing runs of whitespace, it equals (``exact``) or contains
(``contains``) the reference answer or one of its aliases. Questions are rendered with the merged model's chat
template and answered greedily (see ``metrics.py``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from mergekitlite.errors import MergekitliteError

_KEYS = {"question", "answer", "aliases"}


@dataclass(frozen=True)
class QaItem:
    question: str
    answer: str
    aliases: tuple[str, ...] = ()

    @property
    def accepted(self) -> tuple[str, ...]:
        return (self.answer, *self.aliases)


def load_qa(path: Path, limit: int | None = None) -> list[QaItem]:
    """Every item of a JSONL Q/A file; every problem is reported at once, each as ``file:line: message``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise MergekitliteError(f"{path}: no such Q/A file") from None
    except UnicodeDecodeError as exc:
        raise MergekitliteError(f"{path}: not UTF-8 text ({exc})") from None
    items, problems = [], []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{n}: not JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{n}: expected an object with question and answer")
            continue
        unknown = sorted(set(row) - _KEYS)
        if unknown:
            problems.append(f"{path}:{n}: unknown key(s) {unknown} (expected question, answer, aliases)")
        question, answer, aliases = row.get("question"), row.get("answer"), row.get("aliases", [])
        if not isinstance(question, str) or not question.strip():
            problems.append(f"{path}:{n}: 'question' must be a non-empty string")
        if not isinstance(answer, str) or not answer.strip():
            problems.append(f"{path}:{n}: 'answer' must be a non-empty string")
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
            problems.append(f"{path}:{n}: 'aliases' must be a list of non-empty strings")
            aliases = []
        if isinstance(question, str) and isinstance(answer, str):
            items.append(QaItem(question, answer, tuple(aliases)))
    if problems:
        raise MergekitliteError("\n".join(problems))
    if not items:
        raise MergekitliteError(f"{path}: no questions")
    return items[:limit]


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def matches(answer: str, item: QaItem, mode: str) -> bool:
    """Whether a generated ``answer`` is right for ``item`` (``mode``: exact or contains)."""
    got = normalize(answer)
    wanted = [normalize(a) for a in item.accepted]
    return got in wanted if mode == "exact" else any(w in got for w in wanted)
