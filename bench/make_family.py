"""Generate synthetic model families for the benchmarks: a Llama-layout base and N fine-tunes of it.

Fine-tune k is the base plus seeded Gaussian noise relative to each tensor's scale, with a component
shared by all fine-tunes: δₖ = σ·noise·(√ρ·s + √(1−ρ)·eₖ), s and eₖ standard normal, so the task
vectors have pairwise cosine ≈ ρ. Independent deltas (ρ = 0) are enough for timing task arithmetic;
the parity family uses ρ = 0.5, since Model Stock degenerates on independent deltas (cos θ ≈ 0 → the
base) and TIES' sign election becomes a coin toss. The safetensors files are written tensor by
tensor, in row blocks, into every model at once: memory stays at a few hundred MB whatever the size.

    python bench/make_family.py --preset 1.3b        # -> bench/.work/1.3b/{base,ft1,ft2}

A folder is reused when its ``family.json`` marker matches the family; the marker is written last, so
an interrupted generation is redone. Importing this module does not import torch (see write_tensor).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import torch

WORK = Path(__file__).resolve().parent / ".work"
MARKER = "family.json"
FORMAT_VERSION = 2  # bump when the generated content changes, so old folders are regenerated
BLOCK_ELEMENTS = 16 * 1024 * 1024  # rows generated at a time: bounds memory for the embedding
SHARED_STREAM = 7  # generator stream of the shared component; 0 is the base, 1..6 the fine-tunes
# mergekitlite.io.safetensors_header knows these too, but importing it imports torch (see write_tensor).
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
SAFETENSORS_CODE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class Sizes:
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    shard_bytes: int  # target shard size (a shard may exceed it by less than one tensor)


@dataclass(frozen=True)
class Family:
    sizes: Sizes
    fine_tunes: int = 2
    noise: float = 0.05  # delta std relative to the weights' std
    rho: float = 0.0  # pairwise cosine of the fine-tunes' deltas
    seed: int = 0
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if not 0 <= self.fine_tunes < SHARED_STREAM:
            raise ValueError(f"at most {SHARED_STREAM - 1} fine-tunes (generator streams 1..{SHARED_STREAM - 1})")

    @property
    def models(self) -> tuple[str, ...]:
        return ("base", *(f"ft{k}" for k in range(1, self.fine_tunes + 1)))

    def specs(self) -> list[TensorSpec]:
        return tensor_specs(self.sizes, self.dtype)


# GQA (a quarter of the heads for K/V) in the parity presets, so that k/v projections have their usual,
# smaller shape. "parity-small" (25M parameters, 50 MB per model): mergekit needs 5–30 s per method (~7 s
# of it start-up) and a parity run about a quarter of an hour on 2 shared cores; "parity-medium" ~4× that.
PRESETS: dict[str, Family] = {
    # Tiny shards so the quick check still exercises multi-shard inputs.
    "tiny": Family(Sizes(256, 4, 1000, 688, 8, 8, shard_bytes=4_000_000)),
    "1.3b": Family(Sizes(2048, 24, 32000, 5504, 16, 16, shard_bytes=2_000_000_000)),
    "2.6b": Family(Sizes(2048, 48, 32000, 5504, 16, 16, shard_bytes=2_000_000_000)),
    "parity-small": Family(Sizes(512, 6, 8000, 1408, 8, 2, shard_bytes=40_000_000), fine_tunes=3, rho=0.5),
    "parity-medium": Family(Sizes(1024, 8, 16000, 2816, 16, 4, shard_bytes=150_000_000), fine_tunes=3, rho=0.5),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    std: float  # standard deviation of the base's values around ``mean``
    mean: float = 0.0
    dtype: str = "bfloat16"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


def tensor_specs(p: Sizes, dtype: str = "bfloat16") -> list[TensorSpec]:
    """Tensors in HF module order (the order HF writes shards in)."""
    head_dim = p.hidden // p.heads
    kv = p.kv_heads * head_dim
    std = 0.02  # Llama's initializer_range: typical magnitude of trained projection weights too
    shapes: list[tuple[str, tuple[int, ...], float, float]] = [
        ("model.embed_tokens.weight", (p.vocab, p.hidden), std, 0)
    ]
    for i in range(p.layers):
        pre = f"model.layers.{i}"
        shapes += [
            (f"{pre}.self_attn.q_proj.weight", (p.hidden, p.hidden), std, 0),
            (f"{pre}.self_attn.k_proj.weight", (kv, p.hidden), std, 0),
            (f"{pre}.self_attn.v_proj.weight", (kv, p.hidden), std, 0),
            (f"{pre}.self_attn.o_proj.weight", (p.hidden, p.hidden), std, 0),
            (f"{pre}.mlp.gate_proj.weight", (p.intermediate, p.hidden), std, 0),
            (f"{pre}.mlp.up_proj.weight", (p.intermediate, p.hidden), std, 0),
            (f"{pre}.mlp.down_proj.weight", (p.hidden, p.intermediate), std, 0),
            # RMSNorm weights sit around 1.0, so their deltas are far below one bf16 ulp of the value.
            (f"{pre}.input_layernorm.weight", (p.hidden,), 0.05, 1.0),
            (f"{pre}.post_attention_layernorm.weight", (p.hidden,), 0.05, 1.0),
        ]
    shapes += [("model.norm.weight", (p.hidden,), 0.05, 1.0), ("lm_head.weight", (p.vocab, p.hidden), std, 0)]
    return [TensorSpec(name, shape, s, m, dtype) for name, shape, s, m in shapes]


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


def llama_config(p: Sizes, dtype: str = "bfloat16") -> dict[str, object]:
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
        "torch_dtype": dtype,
        "use_cache": True,
    }


def tokenizer_files() -> dict[str, dict[str, object]]:
    """A minimal valid fast tokenizer (WordLevel over the special tokens).

    Both tools copy the tokenizer from the base; without one mergekit falls back to loading it with
    AutoTokenizer and fails after the merge. Its vocabulary need not match vocab_size for this.
    """
    specials = ["<unk>", "<s>", "</s>"]
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": t, **flags} for i, t in enumerate(specials)],
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


Fill = Callable[[TensorSpec, int, list[IO[bytes]]], None]


def write_checkpoints(dirs: list[Path], specs: list[TensorSpec], shard_bytes: int, fill: Fill | None) -> None:
    """The index and safetensors shards of every folder in ``dirs`` (one layout for all). ``fill(spec,
    position, files)`` writes one tensor's bytes into each file; with None the data is a sparse hole
    (no disk used, reads give zeros)."""
    from mergekitlite.io.safetensors_header import layout_shard  # imports torch

    shards = split_shards(specs, shard_bytes)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in specs)},
        "weight_map": {s.name: names[k] for k, shard in enumerate(shards) for s in shard},
    }
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    position = {s.name: i for i, s in enumerate(specs)}
    for shard, fname in zip(shards, names, strict=True):
        layout = layout_shard(fname, [(s.name, SAFETENSORS_CODE[s.dtype], s.shape) for s in shard])
        files = [open(d / fname, "wb", buffering=8 * 1024 * 1024) for d in dirs]  # noqa: SIM115 - closed below
        try:
            for f in files:
                f.write(layout.header)
                if fill is None:
                    f.truncate(layout.size)  # a hole: the tensors' bytes read as zeros
            if fill is not None:
                for spec in shard:
                    fill(spec, position[spec.name], files)
        finally:
            for f in files:
                f.close()
        print(f"  {fname}: {len(shard)} tensors, {sum(s.nbytes for s in shard) / 1e9:.2f} GB per model", flush=True)


def as_bytes(t: torch.Tensor) -> memoryview:
    import torch

    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def write_tensor(family: Family, spec: TensorSpec, position: int, files: list[IO[bytes]]) -> None:
    """Write ``spec``'s bytes for base, ft1, ... (the order of ``files``)."""
    # Imported here so that the harnesses can import this module without torch: a process that has
    # touched hundreds of MB passes that high-water mark on to every child's ru_maxrss (Linux keeps it
    # across fork+exec), which would inflate the measured peaks.
    import torch

    dtype = getattr(torch, family.dtype)
    # One generator per (tensor, stream): a tensor's values do not depend on the shard layout.
    streams = [0, *range(1, family.fine_tunes + 1)] + ([SHARED_STREAM] if family.rho else [])
    gens = [torch.Generator().manual_seed(family.seed * 1_000_003 + position * 8 + m) for m in streams]
    scale = spec.std * family.noise  # the delta is relative to the weight scale, like a real fine-tune's update
    for shape in row_blocks(spec):
        base = torch.randn(shape, generator=gens[0]).mul_(spec.std).add_(spec.mean)
        files[0].write(as_bytes(base.to(dtype)))
        shared = torch.randn(shape, generator=gens[-1]).mul_(math.sqrt(family.rho)) if family.rho else None
        for gen, f in zip(gens[1 : family.fine_tunes + 1], files[1:], strict=True):
            own = torch.randn(shape, generator=gen)
            if shared is not None:
                own.mul_(math.sqrt(1 - family.rho)).add_(shared)
            f.write(as_bytes(own.mul_(scale).add_(base).to(dtype)))


def write_family(out: Path, family: Family) -> None:
    dirs = [out / m for m in family.models]
    for d in dirs:
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(llama_config(family.sizes, family.dtype), indent=2) + "\n")
        for fname, content in tokenizer_files().items():
            (d / fname).write_text(json.dumps(content, indent=2) + "\n")
    write_checkpoints(dirs, family.specs(), family.sizes.shard_bytes, functools.partial(write_tensor, family))


def family_dir(preset: str) -> Path:
    return WORK / preset


def marker(family: Family) -> dict[str, object]:
    return {"format": FORMAT_VERSION, **asdict(family)}


def is_current(out: Path, family: Family) -> bool:
    path = out / MARKER
    return path.exists() and json.loads(path.read_text()) == marker(family)


def ensure_family(family: Family, out: Path, force: bool = False) -> Path:
    """Generate (or reuse) ``out``/{base,ft1,...}; returns ``out``."""
    if not force and is_current(out, family):
        print(f"reusing {out}")
        return out
    if out.exists():
        shutil.rmtree(out)
    specs = family.specs()
    params, size = sum(s.numel for s in specs), sum(s.nbytes for s in specs)
    print(f"generating {out}: {params / 1e6:.1f}M params, {size / 1e6:.0f} MB per model, {family.models}", flush=True)
    started = time.perf_counter()
    write_family(out, family)
    (out / MARKER).write_text(json.dumps(marker(family), indent=2) + "\n")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return out


def preset_family(preset: str, seed: int = 0, noise: float | None = None) -> Family:
    family = replace(PRESETS[preset], seed=seed)
    return family if noise is None else replace(family, noise=noise)


def ensure_in_child(preset: str, seed: int = 0) -> tuple[Path, Family]:
    """A preset's family for a harness, generated (if not current) in a child process, because generating
    here would raise this process's RSS high-water mark, which every later child inherits (procstats)."""
    family, out = preset_family(preset, seed), family_dir(preset)
    if not is_current(out, family):
        subprocess.run([sys.executable, __file__, "--preset", preset, "--seed", str(seed)], check=True)
    return out, family


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, help="fine-tune delta std relative to the weights' std (default: preset's)")
    ap.add_argument("--force", action="store_true", help="regenerate even if a matching family exists")
    args = ap.parse_args(argv)
    ensure_family(preset_family(args.preset, args.seed, args.noise), family_dir(args.preset), args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
