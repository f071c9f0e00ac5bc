"""Measure the demo family and two chat-vector merges of it: does each model end its answers, and what does it know?

For each model: the EOS-termination rate on ``prompts.yaml`` (ChatML prompt, greedy decoding, stopping only on the
model's own ``generation_config`` eos ids, as ``generate`` does for a user) and the perplexity on the held-out
new-domain text ``data/continued_heldout.txt``.

The merges are computed here with plain tensor arithmetic (float32, one cast back), independent of mergekitlite:
``merged = continued + (chat - base)`` for every tensor, then

* ``fixed``  - tokenizer, chat template and generation_config from ``chat`` (the right donor);
* ``broken`` - the same weights with the metadata of ``base`` (eos = <|endoftext|> only, no chat template):
  the seed's never-stopping model. Its user has no template, so they write the ChatML prompt by hand.

Run from the repository root:  ``.venv/bin/python demo/measure.py``  (add ``--model NAME=FOLDER`` to measure,
e.g., the output of ``merge recipes/demo.yaml merged/demo`` alongside).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers.utils import logging

DEMO = Path(__file__).resolve().parent
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CONTEXT = 128  # perplexity window; the family was trained on 128-token windows


@dataclass
class Entry:
    """A model as a user runs it: weights plus the metadata that came with them."""

    name: str
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    generation_config: GenerationConfig

    @property
    def eos_ids(self) -> list[int]:
        eos = self.generation_config.eos_token_id
        return list(eos) if isinstance(eos, list | tuple) else [eos]


@dataclass
class Row:
    name: str
    eos: str
    terminated: float
    im_end_emitted: float
    mean_new_tokens: float
    answer_f1: float
    perplexity: float


# ------------------------------------------------------------------------------------------ loading


def load_entry(name: str, folder: Path) -> Entry:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return Entry(name, model, AutoTokenizer.from_pretrained(folder), GenerationConfig.from_pretrained(folder))


def chat_vector_merge(models: Path) -> dict[str, torch.Tensor]:
    """continued + (chat - base), tensor by tensor, in float32 with one cast to the stored dtype at the end."""
    base, chat, cont = (load_file(models / n / "model.safetensors") for n in ("base", "chat", "continued"))
    assert base.keys() == chat.keys() == cont.keys(), "the family must share tensor names"
    return {k: (cont[k].float() + (chat[k].float() - base[k].float())).to(cont[k].dtype) for k in cont}


def merged_entry(name: str, weights: dict[str, torch.Tensor], metadata_from: Path) -> Entry:
    """The merged weights with config, tokenizer and generation_config of one parent (the donor)."""
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(metadata_from))
    model.load_state_dict(weights, strict=True)
    return Entry(
        name,
        model.float().eval(),
        AutoTokenizer.from_pretrained(metadata_from),
        GenerationConfig.from_pretrained(metadata_from),
    )


# ------------------------------------------------------------------------------------------ prompts


def chatml_by_hand(question: str) -> str:
    """What a user without a chat template types: the ChatML layout of the chat model's card."""
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"


def render_prompt(entry: Entry, question: str) -> str:
    """The model's own chat template where it has one; ChatML by hand where it does not (the broken merge)."""
    hand = chatml_by_hand(question)
    if entry.tokenizer.chat_template is None:
        return hand
    rendered = entry.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == hand, f"{entry.name}: its chat template does not render ChatML: {rendered!r}"
    return rendered


def chatml_prompt_from_chat(chat: Entry, question: str) -> str:
    """Base and continued have no template: they get the prompt rendered by the chat model's template."""
    return chat.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


# ------------------------------------------------------------------------------------------ metrics


@torch.no_grad()
def generate(entry: Entry, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy; stops only on the eos ids of the entry's generation_config (what `generate` does by default)."""
    ids = entry.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    config = copy.deepcopy(entry.generation_config)
    config.max_new_tokens, config.do_sample = max_new_tokens, False
    out = entry.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, ids.shape[1] :].tolist()


def bigram_f1(answer: str, reference: str) -> float:
    """Character-bigram F1 against the reference: a crude 'is it still answering the question' signal."""
    grams = [Counter(s[i : i + 2] for i in range(len(s) - 1)) for s in (answer.strip(), reference.strip())]
    overlap = sum((grams[0] & grams[1]).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(grams[0].values()), overlap / sum(grams[1].values())
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def perplexity(entry: Entry, text: str) -> float:
    """Token-level perplexity over consecutive CONTEXT-token windows of <|endoftext|> doc <|endoftext|> doc ..."""
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    stream = ENDOFTEXT + ENDOFTEXT.join(docs) + ENDOFTEXT
    ids = entry.tokenizer(stream, return_tensors="pt", add_special_tokens=False).input_ids[0]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, CONTEXT):
        window = ids[start : start + CONTEXT + 1].unsqueeze(0)
        if window.shape[1] < 2:
            break
        loss = entry.model(input_ids=window, labels=window).loss  # mean over window.shape[1] - 1 targets
        nll += loss.item() * (window.shape[1] - 1)
        count += window.shape[1] - 1
    return math.exp(nll / count)


def measure(entry: Entry, prompts: list[str], items: list[dict], heldout: str, max_new: int, show: int) -> Row:
    im_end = entry.tokenizer.convert_tokens_to_ids(IM_END)
    terminated = emitted = new_tokens = 0
    f1 = 0.0
    for i, (prompt, item) in enumerate(zip(prompts, items, strict=True)):
        out = generate(entry, prompt, max_new)
        stopped = len(out) > 0 and out[-1] in entry.eos_ids
        terminated += stopped
        emitted += im_end in out
        new_tokens += len(out)
        # Score the answer as the user reads it: up to the end of the turn, special tokens removed.
        answer = out[: out.index(im_end)] if im_end in out else out
        f1 += bigram_f1(entry.tokenizer.decode(answer, skip_special_tokens=True), item["reference"])
        if i < show:
            shown = entry.tokenizer.decode(out, skip_special_tokens=False).replace("\n", "\\n")
            print(f"    [{entry.name}] {item['prompt']} -> {shown}{'' if stopped else ' ...(cut)'}")
    n = len(items)
    return Row(
        entry.name,
        ",".join(entry.tokenizer.convert_ids_to_tokens(entry.eos_ids)),
        terminated / n,
        emitted / n,
        new_tokens / n,
        f1 / n,
        perplexity(entry, heldout),
    )


def print_table(rows: list[Row], max_new: int) -> None:
    print(
        f"\n| model | generation_config eos | terminated (≤{max_new} new tokens) | emits <\\|im_end\\|> "
        "| mean new tokens | answer bigram-F1 | held-out new-domain ppl |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        eos = r.eos.replace("|", "\\|")
        print(
            f"| {r.name} | {eos} | {r.terminated:.0%} | {r.im_end_emitted:.0%} | {r.mean_new_tokens:.1f} "
            f"| {r.answer_f1:.2f} | {r.perplexity:.2f} |"
        )


# ------------------------------------------------------------------------------------------ main


def parse_extra(spec: str) -> tuple[str, Path]:
    name, sep, folder = spec.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got {spec!r}")
    return name, Path(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=DEMO / "models", help="folder with base/ chat/ continued/")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--show", type=int, default=3, help="print this many generations per model")
    parser.add_argument("--model", type=parse_extra, action="append", default=[], help="NAME=FOLDER, also measure")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    logging.set_verbosity_error()  # no load progress bars or long-input notices around the table
    logging.disable_progress_bar()

    items = yaml.safe_load((DEMO / "prompts.yaml").read_text(encoding="utf-8"))
    heldout = (DEMO / "data" / "continued_heldout.txt").read_text(encoding="utf-8")
    family = {n: load_entry(n, args.models / n) for n in ("base", "chat", "continued")}
    weights = chat_vector_merge(args.models)
    entries = [
        *family.values(),
        merged_entry("fixed", weights, metadata_from=args.models / "chat"),
        merged_entry("broken", weights, metadata_from=args.models / "base"),
        *(load_entry(name, folder) for name, folder in args.model),
    ]
    rows = []
    for entry in entries:
        if entry.name in ("base", "continued"):
            prompts = [chatml_prompt_from_chat(family["chat"], it["prompt"]) for it in items]
        else:
            prompts = [render_prompt(entry, it["prompt"]) for it in items]
        rows.append(measure(entry, prompts, items, heldout, args.max_new_tokens, args.show))
    print_table(rows, args.max_new_tokens)


if __name__ == "__main__":
    main()
