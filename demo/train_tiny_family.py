"""Train the tiny demo family (base, chat, continued) on CPU in about a minute.

The family mirrors the chat-vector story in the seed (nekomata-14b + (qarasu-14b-chat - Qwen-14B)):

* ``base``      - a small Llama-layout LM pretrained on general English + Japanese text (``data/general*.txt``,
                  documents separated by <|endoftext|>); eos = <|endoftext|>, no chat template (like Qwen-14B).
* ``chat``      - base fine-tuned on ChatML Q/A (``data/chat*.jsonl``), loss on the assistant turns only, so it
                  ends every answer with <|im_end|>; ships a ChatML template and eos = [<|im_end|>, <|endoftext|>]
                  (like qarasu-14b-chat and Qwen chat models).
* ``continued`` - base trained further on a made-up domain, the island of Talvenna (``data/continued*.txt``),
                  with some general text replayed; eos = <|endoftext|>, no chat template (like nekomata-14b).

All three share one character-level tokenizer whose special tokens exist from the start, and one config, so
their tensors line up name for name and shape for shape and can be merged. Same seed, same bytes: the run is
deterministic (fixed seeds, deterministic algorithms, one thread).

Run from the repository root:  ``.venv/bin/python demo/train_tiny_family.py``
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mergekitlite.tokens import builtin_chat_template

DEMO = Path(__file__).resolve().parent
DATA = DEMO / "data"

ENDOFTEXT, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
# Ids 0..3, fixed: every model of the family has these rows from the first step (as Qwen-14B does), even
# though only the chat fine-tune ever trains the ChatML ones.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, UNK)

# mergekitlite's built-in "chatml" template (no default system prompt).
CHATML_TEMPLATE = builtin_chat_template("chatml")

# Fixed: the float reduction order (hence the exact weights) depends on the thread count. One thread is also the
# fastest on a shared 2-core machine, where two busy threads fight other work for the cores.
THREADS = 1
CONTEXT = 128  # training window, tokens (= characters)


@dataclass(frozen=True)
class Stage:
    """One training stage: optimizer steps, peak learning rate, batch size, and how many windows of the
    general corpus are replayed per step (keeps a fine-tune from drifting far from base's language model)."""

    steps: int
    lr: float
    batch: int = 16
    replay: int = 0


BASE_STAGE = Stage(steps=250, lr=3e-3)
# Chat without replay: replaying general text kept chat's raw-text perplexity nearer base's, but then whether the
# merged model still closed its answers with <|im_end|> depended on the seed (42-100% of the prompts across the seeds
# and replay sizes tried); without it, every seed tried closed 100%.
# Continued with replay: continued pretraining mixes in general data (as nekomata's did), which keeps its delta from
# being all new-domain parroting that would swamp chat's in the merge.
CHAT_STAGE = Stage(steps=100, lr=1e-3)
CONTINUED_STAGE = Stage(steps=100, lr=1e-3, replay=8)


# ----------------------------------------------------------------------------------------------- data


# Hand-written texts plus the templated facts of make_data.py (see there for why both).
GENERAL = (DATA / "general.txt", DATA / "general_facts.txt")
CHATS = (DATA / "chat.jsonl", DATA / "chat_facts.jsonl")
NEW_DOMAIN = (DATA / "continued.txt", DATA / "continued_facts.txt")


def read_documents(*paths: Path) -> list[str]:
    """Documents are separated by blank lines (the training stream joins them with <|endoftext|>)."""
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in paths)
    return [doc.strip() for doc in text.split("\n\n") if doc.strip()]


def read_chats(*paths: Path) -> list[list[dict[str, str]]]:
    lines = [line for p in paths for line in p.read_text(encoding="utf-8").splitlines()]
    return [json.loads(line)["messages"] for line in lines if line.strip()]


def render_chatml(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """ChatML by hand; must equal CHATML_TEMPLATE's output (measure.py checks it)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


# ------------------------------------------------------------------------------------------ tokenizer


def tokenizer_alphabet() -> list[str]:
    """Characters the tokenizer knows: printable ASCII, kana, common Japanese punctuation, and every
    character of the demo texts (which brings in the kanji). Sorted, so the ids never depend on file order."""
    chars = {chr(c) for c in range(0x20, 0x7F)} | {"\n"}
    chars |= {chr(c) for c in range(0x3041, 0x3097)} | {chr(c) for c in range(0x30A1, 0x30FB)} | {"ー"}
    chars |= set("、。「」『』!?・〜()：")
    for path in [*sorted(DATA.iterdir()), DEMO / "prompts.yaml"]:
        chars |= set(path.read_text(encoding="utf-8"))
    return sorted(chars - {"\r", "\t"})


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: a tiny model learns characters of a few KB of text far better than
    the pieces of a BPE vocabulary it would see only a handful of times each."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in tokenizer_alphabet():
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
    core.decoder = decoders.Fuse()  # characters are joined back with nothing in between
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=UNK,
        model_max_length=CONTEXT * 2,
        clean_up_tokenization_spaces=False,
    )


# ------------------------------------------------------------------------------------------ batches

Batch = dict[str, torch.Tensor]


def text_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """Pretraining stream: <|endoftext|> doc <|endoftext|> doc ... (Qwen separates documents this way)."""
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    ids: list[int] = [eot]
    for doc in docs:
        ids += [*tokenizer(doc, add_special_tokens=False).input_ids, eot]
    return torch.tensor(ids)


def lm_batches(stream: torch.Tensor, batch: int, gen: torch.Generator) -> Iterator[Batch]:
    """Random CONTEXT-token windows of the stream; every position is a target."""
    while True:
        starts = torch.randint(0, len(stream) - CONTEXT, (batch,), generator=gen)
        ids = torch.stack([stream[s : s + CONTEXT] for s in starts.tolist()])
        yield {"input_ids": ids, "labels": ids.clone()}


def chat_example(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation: loss on each assistant reply, its <|im_end|> and the newline the
    template puts after it, so the model learns to answer and to close the turn, not to write the user's questions.
    (After <|im_end|> it has then learned a newline, not <|endoftext|>: a runtime that misses <|im_end|> as a stop
    token is not rescued by a lucky <|endoftext|>, just as in the seed.)"""
    ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        head = tokenizer(f"{IM_START}{m['role']}\n", add_special_tokens=False).input_ids
        body = tokenizer(f"{m['content']}{IM_END}", add_special_tokens=False).input_ids
        tail = tokenizer("\n", add_special_tokens=False).input_ids
        ids += head + body + tail
        turn = body + tail if m["role"] == "assistant" else [-100] * (len(body) + len(tail))
        labels += [-100] * len(head) + turn
    return ids, labels


def chat_batches(examples: list[tuple[list[int], list[int]]], pad_id: int, batch: int, gen: torch.Generator):
    """Random batches of whole conversations, right-padded (padding masked out of attention and loss)."""
    while True:
        picks = torch.randint(0, len(examples), (batch,), generator=gen).tolist()
        width = max(len(examples[i][0]) for i in picks)
        ids = torch.full((batch, width), pad_id)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, i in enumerate(picks):
            x, y = examples[i]
            ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ------------------------------------------------------------------------------------------ training


def mixed(*sources: Iterator[Batch]) -> Iterator[list[Batch]]:
    """One batch from each source per optimizer step."""
    while True:
        yield [next(source) for source in sources]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)


def make_model(vocab_size: int, eot_id: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT * 2,
        tie_word_embeddings=False,  # separate lm_head.weight, as in Qwen-14B: the rows a merge must get right
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        # No pad id in the model config: it would make <|endoftext|> the embedding's padding_idx, a zero row that
        # never trains, although the row is read at every document boundary. (Padding is masked out anyway.)
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).float()


def lr_at(step: int, stage: Stage) -> float:
    """Linear warmup over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, stage.steps // 20)
    if step < warmup:
        return stage.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, stage.steps - warmup)
    return stage.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(model: LlamaForCausalLM, batches: Iterator[list[Batch]], stage: Stage, name: str) -> float:
    """Plain AdamW loop (no Trainer: fewer moving parts, and it is deterministic). Returns the last loss.
    No weight decay, so rows no batch ever touches (e.g. <|im_start|> in base) stay exactly as initialized."""
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    loss_value = float("nan")
    for step in range(stage.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, stage)
        # Several batches per step (e.g. chat + replayed general text): their losses are averaged.
        parts = next(batches)
        loss = sum(model(**batch).loss for batch in parts) / len(parts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()
        if step % 100 == 0 or step == stage.steps - 1:
            print(f"  {name:9s} step {step:4d}/{stage.steps}  loss {loss_value:.3f}", flush=True)
    model.eval()
    return loss_value


# ------------------------------------------------------------------------------------------ saving


def save_model(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    out: Path,
    eos_ids: list[int],
    chat_template: str | None,
) -> None:
    """Weights (safetensors, float32), config, generation_config and tokenizer files, as a hub repo has them."""
    out.mkdir(parents=True, exist_ok=True)
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0], pad_token_id=eot
    )
    model.save_pretrained(out)  # safetensors is the only format transformers 5 writes
    tokenizer.save_pretrained(out)
    _put_chat_template_in_tokenizer_config(out, chat_template)


def _put_chat_template_in_tokenizer_config(out: Path, chat_template: str | None) -> None:
    """Keep the template inside tokenizer_config.json, where Qwen-era repos (the seed's) keep it, instead of
    transformers 5's separate chat_template.jinja; and name the portable tokenizer class."""
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------ main


def train_stage(
    model: LlamaForCausalLM,
    name: str,
    stage: Stage,
    batches: Iterator[Batch],
    general: torch.Tensor,
    gen: torch.Generator,
) -> None:
    start = time.perf_counter()
    sources = [batches] + ([lm_batches(general, stage.replay, gen)] if stage.replay else [])
    loss = train(model, mixed(*sources), stage, name)
    print(f"  {name}: final loss {loss:.3f}, {time.perf_counter() - start:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEMO / "models", help="folder that gets base/ chat/ continued/")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    seed_everything(args.seed)

    tokenizer = build_tokenizer()
    eot, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    gen = torch.Generator().manual_seed(args.seed)
    print(f"vocab {len(tokenizer)} tokens; seed {args.seed}; {THREADS} threads")

    base = make_model(len(tokenizer), eot)
    print(f"model: {sum(p.numel() for p in base.parameters()):,} parameters")
    general = text_stream(tokenizer, read_documents(*GENERAL))
    train_stage(base, "base", BASE_STAGE, lm_batches(general, BASE_STAGE.batch, gen), general, gen)

    chat = copy.deepcopy(base)
    examples = [chat_example(tokenizer, m) for m in read_chats(*CHATS)]
    train_stage(chat, "chat", CHAT_STAGE, chat_batches(examples, eot, CHAT_STAGE.batch, gen), general, gen)

    continued = copy.deepcopy(base)
    domain = text_stream(tokenizer, read_documents(*NEW_DOMAIN))
    train_stage(continued, "continued", CONTINUED_STAGE, lm_batches(domain, CONTINUED_STAGE.batch, gen), general, gen)

    save_model(base, tokenizer, args.out / "base", [eot], None)
    save_model(chat, tokenizer, args.out / "chat", [im_end, eot], CHATML_TEMPLATE)
    save_model(continued, tokenizer, args.out / "continued", [eot], None)
    print(f"saved to {args.out}; total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
