"""Header-only stand-ins of the seed's three Qwen-14B checkpoints, in a private Hugging Face cache.

Each stand-in has Qwen-14B's real tensor names, shapes and bf16 dtype in sharded safetensors files
whose data is a sparse hole (no disk used, reads return zeros), plus config.json, tokenizer files
and generation_config.json like the real repositories. With ``HF_HUB_CACHE`` pointing at the cache
and ``HF_HUB_OFFLINE=1``, ``recipes/nekoqarasu.yaml`` runs unchanged:

    python bench/qwen14b_standins.py                      # writes bench/.work/hf-cache
    HF_HUB_CACHE=bench/.work/hf-cache HF_HUB_OFFLINE=1 \\
        mergekitlite plan recipes/nekoqarasu.yaml --max-ram 32GB --max-vram 8GB --device cuda

That gives the plan's memory estimate at real scale on any machine, and a real-scale merge whose
reads cost nothing, which isolates the tool's own memory and CPU behaviour.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from make_family import TensorSpec, write_checkpoints

HIDDEN = 5120
LAYERS = 40
VOCAB = 152064
FFN = 13696  # Qwen v1: w1, w2 are [FFN, HIDDEN]; mlp.c_proj is [HIDDEN, FFN]
SHARD = 2 * 1000**3
COMMIT = "0" * 40

MODELS = {
    "Qwen/Qwen-14B": {"chat": False},
    "rinna/nekomata-14b": {"chat": False},
    "lightblue/qarasu-14B-chat-plus-unleashed": {"chat": True},
}

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tensors() -> list[TensorSpec]:
    out = [("transformer.wte.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        out += [
            (p + "ln_1.weight", (HIDDEN,)),
            (p + "attn.c_attn.weight", (3 * HIDDEN, HIDDEN)),
            (p + "attn.c_attn.bias", (3 * HIDDEN,)),
            (p + "attn.c_proj.weight", (HIDDEN, HIDDEN)),
            (p + "ln_2.weight", (HIDDEN,)),
            (p + "mlp.w1.weight", (FFN, HIDDEN)),
            (p + "mlp.w2.weight", (FFN, HIDDEN)),
            (p + "mlp.c_proj.weight", (HIDDEN, FFN)),
        ]
    out += [("transformer.ln_f.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return [TensorSpec(name, shape, std=0.0) for name, shape in out]


def config() -> dict[str, object]:
    return {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "model_type": "qwen",
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 40,
        "vocab_size": VOCAB,
        "seq_length": 2048,
        "bf16": True,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "eos_token_id": 151643,
    }


def write_model(root: Path, repo: str, chat: bool) -> Path:
    folder = root / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    write_checkpoints([snap], tensors(), SHARD, fill=None)  # sparse: the data is a hole
    (snap / "config.json").write_text(json.dumps(config(), indent=2))
    for code in ("configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py"):
        (snap / code).write_text(f"# stand-in for Qwen's {code}: copied by the merge, never executed\n")
    (snap / "qwen.tiktoken").write_text("stand-in\n")
    tok_cfg: dict[str, object] = {
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
        "tokenizer_class": "QWenTokenizer",
        "added_tokens_decoder": {
            "151643": {"content": "<|endoftext|>", "special": True},
            "151644": {"content": "<|im_start|>", "special": True},
            "151645": {"content": "<|im_end|>", "special": True},
        },
        "eos_token": "<|endoftext|>",
    }
    gen: dict[str, object] = {"eos_token_id": 151643, "max_new_tokens": 512}
    if chat:
        tok_cfg["chat_template"] = CHATML
        gen = {"eos_token_id": [151645, 151643], "max_new_tokens": 512}
    (snap / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (snap / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return snap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("bench/.work/hf-cache"))
    args = parser.parse_args()
    for repo, spec in MODELS.items():
        snap = write_model(args.cache, repo, spec["chat"])
        apparent = sum(p.stat().st_size for p in snap.glob("*.safetensors"))
        print(f"{repo}: {apparent / 1e9:.1f} GB apparent, sparse, in {snap}")


if __name__ == "__main__":
    main()
