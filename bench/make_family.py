"""Generate a family of three bf16 Llama-layout checkpoints for benchmarks: base, ft1, ft2.

The fine-tunes are the base plus small seeded Gaussian noise, so a task-arithmetic merge of them
has realistic magnitudes (deltas a few bf16 ulps of the weights) without downloading anything.
The safetensors files are written by hand, tensor by tensor in row blocks, into all three models
at once: memory stays at a few hundred MB whatever the preset, and every random number is drawn
once per model (the base's values are reused for both fine-tunes).

    python bench/make_family.py --preset 1.3b        # -> bench/.work/1.3b/{base,ft1,ft2}

A folder is reused when its ``family.json`` marker matches the preset, seed and noise; the marker
is written last, so an interrupted generation is redone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

WORK = Path(__file__).resolve().parent / ".work"
MODELS = ("base", "ft1", "ft2")
MARKER = "family.json"
FORMAT_VERSION = 1  # bump when the generated content changes, so old folders are regenerated
BLOCK_ELEMENTS = 16 * 1024 * 1024  # rows generated at a time: bounds memory for the embedding


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    shard_bytes: int  # target shard size (a shard may exceed it by less than one tensor)


PRESETS: dict[str, Preset] = {
    # Tiny shards so the quick check still exercises multi-shard inputs.
    "tiny": Preset(hidden=256, layers=4, vocab=1000, intermediate=688, heads=8, kv_heads=8, shard_bytes=4_000_000),
    "1.3b": Preset(
        hidden=2048, layers=24, vocab=32000, intermediate=5504, heads=16, kv_heads=16, shard_bytes=2_000_000_000
    ),
    "2.6b": Preset(
        hidden=2048, layers=48, vocab=32000, intermediate=5504, heads=16, kv_heads=16, shard_bytes=2_000_000_000
    ),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    std: float  # standard deviation of the base's values around ``mean``
    mean: float = 0.0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * 2  # bf16


def tensor_specs(p: Preset) -> list[TensorSpec]:
    """Tensors in HF module order (the order HF writes shards in)."""
    head_dim = p.hidden // p.heads
    kv = p.kv_heads * head_dim
    std = 0.02  # Llama's initializer_range: typical magnitude of trained projection weights too
    specs = [TensorSpec("model.embed_tokens.weight", (p.vocab, p.hidden), std)]
    for i in range(p.layers):
        pre = f"model.layers.{i}"
        specs += [
            TensorSpec(f"{pre}.self_attn.q_proj.weight", (p.hidden, p.hidden), std),
            TensorSpec(f"{pre}.self_attn.k_proj.weight", (kv, p.hidden), std),
            TensorSpec(f"{pre}.self_attn.v_proj.weight", (kv, p.hidden), std),
            TensorSpec(f"{pre}.self_attn.o_proj.weight", (p.hidden, p.hidden), std),
            TensorSpec(f"{pre}.mlp.gate_proj.weight", (p.intermediate, p.hidden), std),
            TensorSpec(f"{pre}.mlp.up_proj.weight", (p.intermediate, p.hidden), std),
            TensorSpec(f"{pre}.mlp.down_proj.weight", (p.hidden, p.intermediate), std),
            # RMSNorm weights sit around 1.0, so their deltas are far below one bf16 ulp of the value.
            TensorSpec(f"{pre}.input_layernorm.weight", (p.hidden,), 0.05, 1.0),
            TensorSpec(f"{pre}.post_attention_layernorm.weight", (p.hidden,), 0.05, 1.0),
        ]
    specs += [
        TensorSpec("model.norm.weight", (p.hidden,), 0.05, 1.0),
        TensorSpec("lm_head.weight", (p.vocab, p.hidden), std),
    ]
    return specs


def split_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The 8-byte length plus JSON header, padded with spaces to 8 bytes as safetensors does."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        meta[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def llama_config(p: Preset) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.hidden,
        "intermediate_size": p.intermediate,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "vocab_size": p.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def tokenizer_files() -> dict[str, dict[str, object]]:
    """A minimal valid fast tokenizer (WordLevel over the special tokens).

    Both tools copy the tokenizer from the base; without one mergekit falls back to loading it with
    AutoTokenizer and fails after the merge. Its vocabulary need not match vocab_size for this.
    """
    specials = ["<unk>", "<s>", "</s>"]
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(specials)
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(specials)}, "unk_token": "<unk>"},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
    }
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def row_blocks(spec: TensorSpec) -> Iterator[tuple[int, ...]]:
    """Shapes of successive row blocks of at most BLOCK_ELEMENTS elements."""
    if len(spec.shape) < 2:
        yield spec.shape
        return
    row = spec.numel // spec.shape[0]
    step = max(1, BLOCK_ELEMENTS // row)
    for start in range(0, spec.shape[0], step):
        yield (min(step, spec.shape[0] - start), *spec.shape[1:])


def as_bytes(t: torch.Tensor) -> memoryview:
    import torch

    return memoryview(t.contiguous().view(torch.int16).numpy()).cast("B")


def write_tensor(spec: TensorSpec, index: int, seed: int, noise: float, files: list) -> None:
    """Write ``spec``'s bytes for base, ft1, ft2 (in that order in ``files``)."""
    # Imported here so that run_bench.py can import this module without torch: a benchmark
    # harness that has touched hundreds of MB passes that high-water mark on to every child's
    # ru_maxrss (Linux keeps it across fork+exec), which would inflate the measured peaks.
    import torch

    # One generator per (tensor, model): a tensor's values do not depend on the shard layout.
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + index * 8 + m) for m in range(len(files))]
    for shape in row_blocks(spec):
        base = torch.randn(shape, generator=gens[0]).mul_(spec.std).add_(spec.mean)
        files[0].write(as_bytes(base.to(torch.bfloat16)))
        for gen, f in zip(gens[1:], files[1:], strict=True):
            # The delta is relative to the weight scale (std), like a real fine-tune's small update.
            ft = torch.randn(shape, generator=gen).mul_(spec.std * noise).add_(base)
            f.write(as_bytes(ft.to(torch.bfloat16)))


def write_family(out: Path, preset: Preset, seed: int, noise: float) -> None:
    specs = tensor_specs(preset)
    shards = split_shards(specs, preset.shard_bytes)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    dirs = [out / m for m in MODELS]
    for d in dirs:
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(llama_config(preset), indent=2) + "\n")
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {s.name: names[k] for k, shard in enumerate(shards) for s in shard},
        }
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for fname, content in tokenizer_files().items():
            (d / fname).write_text(json.dumps(content, indent=2) + "\n")
    order = {s.name: i for i, s in enumerate(specs)}
    for shard, fname in zip(shards, names, strict=True):
        header = safetensors_header(shard)
        files = [open(d / fname, "wb", buffering=8 * 1024 * 1024) for d in dirs]  # noqa: SIM115 - closed below
        try:
            for f in files:
                f.write(header)
            for spec in shard:
                write_tensor(spec, order[spec.name], seed, noise, files)
        finally:
            for f in files:
                f.close()
        print(f"  {fname}: {len(shard)} tensors, {sum(s.nbytes for s in shard) / 1e9:.2f} GB per model", flush=True)


def family_dir(preset: str) -> Path:
    return WORK / preset


def wanted_marker(preset: str, seed: int, noise: float) -> dict[str, object]:
    return {"format": FORMAT_VERSION, "preset": preset, **asdict(PRESETS[preset]), "seed": seed, "noise": noise}


def is_current(preset: str, seed: int = 0, noise: float = 0.05) -> bool:
    marker = family_dir(preset) / MARKER
    return marker.exists() and json.loads(marker.read_text()) == wanted_marker(preset, seed, noise)


def ensure_family(preset: str, seed: int = 0, noise: float = 0.05, force: bool = False) -> Path:
    """Generate (or reuse) bench/.work/<preset>/{base,ft1,ft2}; returns bench/.work/<preset>."""
    p = PRESETS[preset]
    out = family_dir(preset)
    marker = out / MARKER
    if not force and is_current(preset, seed, noise):
        print(f"reusing {out} (preset {preset}, seed {seed}, noise {noise})")
        return out
    if out.exists():
        shutil.rmtree(out)
    specs = tensor_specs(p)
    params = sum(s.numel for s in specs)
    print(f"generating {out}: {params / 1e9:.3f}B params, {params * 2 / 1e9:.2f} GB per model, 3 models", flush=True)
    started = time.perf_counter()
    write_family(out, p, seed, noise)
    marker.write_text(json.dumps(wanted_marker(preset, seed, noise), indent=2) + "\n")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.05, help="fine-tune delta std relative to the weights' std")
    ap.add_argument("--force", action="store_true", help="regenerate even if a matching family exists")
    args = ap.parse_args(argv)
    ensure_family(args.preset, args.seed, args.noise, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
