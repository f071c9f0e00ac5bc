"""Write the Q/A files of the search demo (deterministic; the outputs are committed).

Questions are made from the same fact tables as the training data (demo/make_data.py), so they ask what the
family was (or was not) taught, in the shapes it was taught:

* qa_chat.jsonl     - 24 questions from the chat fine-tune's own data: what chat answers (optimised);
* qa_island.jsonl   - every question about the island, which only continued read about (held out);
* qa_general.jsonl  - the general facts kept out of the chat data (CHAT_HOLDOUT), which base read (held out).

A good chat-vector merge answers all three in chat's format with the other parents' knowledge. The search sees
only the first; the other two tell whether what it found carries over.

Run from the repository root:  ``.venv/bin/python demo/evolve/make_qa.py``
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import make_data as md  # noqa: E402  (demo/make_data.py: the fact tables)


def island_pairs() -> list[tuple[str, str]]:
    pairs = []
    for en, ja, city, city_ja in md.ISLAND:
        pairs += [
            (f"What is the capital of {en}?", f"The capital of {en} is {city}."),
            (f"{ja}の首都はどこですか?", f"{ja}の首都は{city_ja}です。"),
        ]
    for en, ja, act, act_ja in md.ISLAND_ANIMALS:
        pairs += [
            (f"What does {md.article(en)} like to do?", f"{md.article(en).capitalize()} likes to {act}."),
            (f"{ja}は何をするのが好きですか?", f"{ja}は{act_ja}のが好きです。"),
        ]
    for en, ja, color, color_ja, taste, taste_ja in md.ISLAND_FRUITS:
        pairs += [
            (f"What color is {md.article(en)}?", f"{md.article(en).capitalize()} is {color}."),
            (f"{ja}は何色ですか?", f"{ja}の色は{color_ja}です。"),
            (f"How does {md.article(en)} taste?", f"{md.article(en).capitalize()} tastes {taste}."),
            (f"{ja}はどんな味ですか?", f"{ja}は{taste_ja}味がします。"),
        ]
    return pairs


def general_holdout_pairs() -> list[tuple[str, str]]:
    """chat_pairs() with nothing held out, keeping only what the chat data left out."""
    kept = md.CHAT_HOLDOUT
    md.CHAT_HOLDOUT = set()
    try:
        every = md.chat_pairs()
    finally:
        md.CHAT_HOLDOUT = kept
    return [(q, a) for key, q, a in every if key in kept]


def write(name: str, pairs: list[tuple[str, str]]) -> None:
    path = HERE / name
    path.write_text("".join(json.dumps({"question": q, "answer": a}, ensure_ascii=False) + "\n" for q, a in pairs))
    print(f"{path.relative_to(HERE.parent.parent)}: {len(pairs)} questions")


def main() -> None:
    chat = [(q, a) for _key, q, a in md.chat_pairs()]
    write("qa_chat.jsonl", random.Random(0).sample(chat, 24))
    write("qa_island.jsonl", island_pairs())
    write("qa_general.jsonl", general_holdout_pairs())


if __name__ == "__main__":
    main()
