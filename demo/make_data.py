"""Write the templated part of the demo corpora into demo/data/ (deterministic; the outputs are committed).

The hand-written texts (general.txt, continued.txt, continued_heldout.txt, chat.jsonl) are a few KB each: a tiny
model memorizes them within a few hundred steps and then generalizes nothing. These templated facts, rendered in
English and Japanese with several phrasings each, give it patterns to learn instead:

* general_facts.txt  - world facts (capitals, animals, fruit, sums) as documents, for base;
* continued_facts.txt - facts about the made-up island Talvenna in the *same* sentence patterns, for continued;
* chat_facts.jsonl   - ChatML Q/A pairs on the general facts, for chat. Some facts are left out of the chat data
  on purpose, so prompts.yaml can ask about them: chat has to combine what base read with the answer format.

Run from the repository root:  ``.venv/bin/python demo/make_data.py``
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"

# (English, Japanese) renderings of each fact's parts.
COUNTRIES = [
    ("Japan", "日本", "Tokyo", "東京"),
    ("France", "フランス", "Paris", "パリ"),
    ("England", "イギリス", "London", "ロンドン"),
    ("Italy", "イタリア", "Rome", "ローマ"),
    ("Germany", "ドイツ", "Berlin", "ベルリン"),
    ("Spain", "スペイン", "Madrid", "マドリード"),
    ("Egypt", "エジプト", "Cairo", "カイロ"),
    ("Korea", "韓国", "Seoul", "ソウル"),
    ("China", "中国", "Beijing", "北京"),
    ("Canada", "カナダ", "Ottawa", "オタワ"),
]
ANIMALS = [
    ("cat", "ねこ", "sleep in warm places", "あたたかい場所で眠る"),
    ("dog", "犬", "walk with people", "人と散歩する"),
    ("bird", "鳥", "sing in the morning", "朝に歌う"),
    ("horse", "馬", "run in the field", "野原を走る"),
    ("rabbit", "うさぎ", "eat fresh grass", "草を食べる"),
    ("frog", "かえる", "jump in the rain", "雨の中ではねる"),
    ("owl", "ふくろう", "fly at night", "夜に飛ぶ"),
    ("bee", "はち", "collect nectar", "みつを集める"),
    ("bear", "くま", "sleep in winter", "冬に眠る"),
    ("duck", "あひる", "swim in the pond", "池で泳ぐ"),
]
FRUITS = [
    ("apple", "りんご", "red", "赤", "sweet", "あまい"),
    ("lemon", "レモン", "yellow", "黄色", "sour", "すっぱい"),
    ("banana", "バナナ", "yellow", "黄色", "sweet", "あまい"),
    ("grape", "ぶどう", "purple", "むらさき", "sweet", "あまい"),
    ("lime", "ライム", "green", "緑", "sour", "すっぱい"),
    ("orange", "オレンジ", "orange", "オレンジ", "sweet", "あまい"),
    ("peach", "もも", "pink", "ピンク", "sweet", "あまい"),
    ("melon", "メロン", "green", "緑", "sweet", "あまい"),
]
NUMBERS = [
    ("zero", "零"), ("one", "一"), ("two", "二"), ("three", "三"), ("four", "四"), ("five", "五"), ("six", "六"),
    ("seven", "七"), ("eight", "八"), ("nine", "九"), ("ten", "十"),
]  # fmt: skip
SUMS = [(a, b) for a in range(1, 6) for b in range(1, 6)]

# The new domain, in the same shapes as the general facts: this is what continued learns and base never sees.
ISLAND = [("Talvenna", "タルヴェナ", "Orrin Bay", "オリン湾")]
ISLAND_ANIMALS = [
    ("toll", "トール", "swim in the Kessa River", "ケッサ川で泳ぐ"),
    ("seal", "あざらし", "rest on the rocks of Gull Point", "カモメ岬の岩で休む"),
    ("heron", "さぎ", "fish in Orrin Bay", "オリン湾で魚をとる"),
]
ISLAND_FRUITS = [
    ("mirrow", "ミロウ", "purple", "むらさき", "sweet", "あまい"),
    ("kessa berry", "ケッサベリー", "blue", "青", "sour", "すっぱい"),
]

# Left out of the chat data (prompts.yaml asks about them): chat must get them from base's reading.
CHAT_HOLDOUT = {"Italy", "Canada", "owl", "duck", "grape", "peach", "4+5", "3+2"}

Fact = tuple[list[str], list[str]]  # (English phrasings, Japanese phrasings)


def article(noun: str) -> str:
    """English indefinite article."""
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def capital_fact(c: tuple[str, str, str, str]) -> Fact:
    en, ja, city, city_ja = c
    return (
        [
            f"The capital of {en} is {city}.",
            f"{city} is the capital of {en}.",
            f"Many people visit {city}, the capital of {en}.",
        ],
        [f"{ja}の首都は{city_ja}です。", f"{city_ja}は{ja}の首都です。", f"{ja}の首都の{city_ja}に人が来ます。"],
    )


def animal_fact(a: tuple[str, str, str, str]) -> Fact:
    en, ja, act, act_ja = a
    return (
        [
            f"{article(en).capitalize()} likes to {act}.",
            f"Every {en} likes to {act}.",
            f"You can see that {article(en)} likes to {act}.",
        ],
        [f"{ja}は{act_ja}のが好きです。", f"どの{ja}も{act_ja}のが好きです。"],
    )


def fruit_facts(f: tuple[str, str, str, str, str, str]) -> list[Fact]:
    en, ja, color, color_ja, taste, taste_ja = f
    return [
        (
            [f"{article(en).capitalize()} is {color}.", f"The color of {article(en)} is {color}."],
            [f"{ja}の色は{color_ja}です。", f"{ja}は{color_ja}の色をしています。"],
        ),
        (
            [f"{article(en).capitalize()} tastes {taste}.", f"The taste of {article(en)} is {taste}."],
            [f"{ja}は{taste_ja}味がします。", f"{ja}を食べると{taste_ja}味がします。"],
        ),
    ]


def sum_fact(a: int, b: int) -> Fact:
    (ea, ja_a), (eb, ja_b), (ec, ja_c) = NUMBERS[a], NUMBERS[b], NUMBERS[a + b]
    return ([f"{ea.capitalize()} plus {eb} is {ec}."], [f"{ja_a}たす{ja_b}は{ja_c}です。"])


def general_facts() -> list[Fact]:
    facts = [capital_fact(c) for c in COUNTRIES] + [animal_fact(a) for a in ANIMALS]
    facts += [f for fruit in FRUITS for f in fruit_facts(fruit)]
    return facts + [sum_fact(a, b) for a, b in SUMS]


def island_facts() -> list[Fact]:
    facts = [capital_fact(c) for c in ISLAND] + [animal_fact(a) for a in ISLAND_ANIMALS]
    return facts + [f for fruit in ISLAND_FRUITS for f in fruit_facts(fruit)]


def render_document(picked: list[Fact], rng: random.Random) -> str:
    """Facts in Japanese on one line, the same facts in English on the next (the layout of the hand-written
    corpus: the last line is long, so <|endoftext|> rarely comes soon after a newline)."""
    ja = "".join(rng.choice(f[1]) for f in picked)
    en = " ".join(rng.choice(f[0]) for f in picked)
    return f"{ja}\n{en}"


def general_documents(count: int, rng: random.Random) -> list[str]:
    return [render_document(rng.sample(general_facts(), rng.randint(5, 8)), rng) for _ in range(count)]


def island_documents(count: int, rng: random.Random) -> list[str]:
    """New-domain documents mention the island among ordinary facts, as web text about a place does. Island facts
    alone (a handful, repeated) would make continued a parrot of them, and its delta would swamp chat's in a merge."""
    docs = []
    for _ in range(count):
        picked = rng.sample(island_facts(), rng.randint(2, 4)) + rng.sample(general_facts(), rng.randint(2, 4))
        rng.shuffle(picked)
        docs.append(render_document(picked, rng))
    return docs


# --------------------------------------------------------------------------------------------- chat


def chat_pairs() -> list[tuple[str, str, str]]:
    """(key, question, answer) for every general fact, in both languages; key names the fact for CHAT_HOLDOUT."""
    pairs: list[tuple[str, str, str]] = []
    for en, ja, city, city_ja in COUNTRIES:
        pairs += [
            (en, f"What is the capital of {en}?", f"The capital of {en} is {city}."),
            (en, f"{ja}の首都はどこですか?", f"{ja}の首都は{city_ja}です。"),
        ]
    for en, ja, act, act_ja in ANIMALS:
        pairs += [
            (en, f"What does {article(en)} like to do?", f"{article(en).capitalize()} likes to {act}."),
            (en, f"{ja}は何をするのが好きですか?", f"{ja}は{act_ja}のが好きです。"),
        ]
    for en, ja, color, color_ja, taste, taste_ja in FRUITS:
        pairs += [
            (en, f"What color is {article(en)}?", f"{article(en).capitalize()} is {color}."),
            (en, f"{ja}は何色ですか?", f"{ja}の色は{color_ja}です。"),
            (en, f"How does {article(en)} taste?", f"{article(en).capitalize()} tastes {taste}."),
            (en, f"{ja}はどんな味ですか?", f"{ja}は{taste_ja}味がします。"),
        ]
    for a, b in SUMS:
        (ea, ja_a), (eb, ja_b), (ec, ja_c) = NUMBERS[a], NUMBERS[b], NUMBERS[a + b]
        pairs += [
            (f"{a}+{b}", f"What is {ea} plus {eb}?", f"{ea.capitalize()} plus {eb} is {ec}."),
            (f"{a}+{b}", f"{ja_a}たす{ja_b}はいくつですか?", f"{ja_a}たす{ja_b}は{ja_c}です。"),
        ]
    return [p for p in pairs if p[0] not in CHAT_HOLDOUT]


def chat_messages(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def write_lines(path: Path, lines: list[str], sep: str) -> None:
    path.write_text(sep.join(lines) + "\n", encoding="utf-8")
    print(f"{path.relative_to(DATA.parent.parent)}: {len(lines)} items, {path.stat().st_size:,} bytes")


def main() -> None:
    rng = random.Random(0)
    write_lines(DATA / "general_facts.txt", general_documents(100, rng), "\n\n")
    write_lines(DATA / "continued_facts.txt", island_documents(40, rng), "\n\n")
    chats = [json.dumps({"messages": chat_messages(q, r)}, ensure_ascii=False) for _, q, r in chat_pairs()]
    write_lines(DATA / "chat_facts.jsonl", chats, "\n")


if __name__ == "__main__":
    main()
