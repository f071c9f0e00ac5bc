"""Generate the parity benchmark's model family: a bf16 Llama base and three correlated fine-tunes.

Like bench/make_family.py (whose layout, headers, config and tokenizer it reuses), but with three
fine-tunes whose deltas share a common component: δᵢ = σ·noise·(√ρ·s + √(1−ρ)·eᵢ), s and eᵢ standard
normal, so the task vectors have pairwise cosine ≈ ρ. Independent deltas (make_family's) would make
Model Stock degenerate (cos θ ≈ 0 → t ≈ 0, the output is the base) and TIES' sign election a coin
toss; real fine-tunes of one base are correlated.

    python bench/parity_family.py --preset small  # -> bench/.work/parity-small/{base,ft1,ft2,ft3}

Reused when its ``family.json`` marker matches (written last, so an interrupted run is redone).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import make_family
from make_family import Preset, TensorSpec

WORK = Path(__file__).resolve().parent / ".work"
MODELS = ("base", "ft1", "ft2", "ft3")
FORMAT_VERSION = 1
# GQA (a quarter of the heads for K/V) so that k/v projections have their usual, smaller shape; 2 shards
# per model. "small" (25M parameters, 50 MB per model): mergekit needs 5–30 s per method (~7 s of it
# start-up) and a parity run (18 recipes × 2 tools × 2 rounds + checks) about a quarter of an hour on
# 2 shared cores; "medium" (123M, 246 MB) costs ~4× that.
PRESETS = {
    "small": Preset(hidden=512, layers=6, vocab=8000, intermediate=1408, heads=8, kv_heads=2, shard_bytes=40_000_000),
    "medium": Preset(
        hidden=1024, layers=8, vocab=16000, intermediate=2816, heads=16, kv_heads=4, shard_bytes=150_000_000
    ),
}
NOISE = 0.05  # delta std relative to the weights' std (as make_family)
RHO = 0.5  # pairwise cosine of the fine-tunes' deltas


def family_dir(preset: str) -> Path:
    return WORK / f"parity-{preset}"


def marker(preset: str, seed: int) -> dict[str, object]:
    return {
        "format": FORMAT_VERSION,
        "preset": preset,
        **asdict(PRESETS[preset]),
        "seed": seed,
        "noise": NOISE,
        "rho": RHO,
        "models": list(MODELS),
    }


def is_current(preset: str, seed: int = 0) -> bool:
    path = family_dir(preset) / make_family.MARKER
    return path.exists() and json.loads(path.read_text()) == marker(preset, seed)


def write_tensor(spec: TensorSpec, index: int, seed: int, files: list) -> None:
    """Write ``spec``'s bytes for base, ft1, ft2, ft3 (the order of ``files``)."""
    import torch

    # One generator per (tensor, stream): values do not depend on the shard layout. Stream 0 is the
    # base, 1..3 the fine-tunes' own noise, 7 the shared component.
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + index * 8 + m) for m in (0, 1, 2, 3, 7)]
    scale = spec.std * NOISE
    for shape in make_family.row_blocks(spec):
        base = torch.randn(shape, generator=gens[0]).mul_(spec.std).add_(spec.mean)
        files[0].write(make_family.as_bytes(base.to(torch.bfloat16)))
        own = [torch.randn(shape, generator=g) for g in gens[1:4]]
        shared = torch.randn(shape, generator=gens[4]).mul_(math.sqrt(RHO))
        for noise, f in zip(own, files[1:], strict=True):
            ft = noise.mul_(math.sqrt(1 - RHO)).add_(shared).mul_(scale).add_(base)
            f.write(make_family.as_bytes(ft.to(torch.bfloat16)))


def write_family(out: Path, preset: Preset, seed: int) -> None:
    specs = make_family.tensor_specs(preset)
    shards = make_family.split_shards(specs, preset.shard_bytes)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    dirs = [out / m for m in MODELS]
    for d in dirs:
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(make_family.llama_config(preset), indent=2) + "\n")
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {s.name: names[k] for k, shard in enumerate(shards) for s in shard},
        }
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for fname, content in make_family.tokenizer_files().items():
            (d / fname).write_text(json.dumps(content, indent=2) + "\n")
    order = {s.name: i for i, s in enumerate(specs)}
    for shard, fname in zip(shards, names, strict=True):
        header = make_family.safetensors_header(shard)
        files = [open(d / fname, "wb", buffering=8 * 1024 * 1024) for d in dirs]  # noqa: SIM115 - closed below
        try:
            for f in files:
                f.write(header)
            for spec in shard:
                write_tensor(spec, order[spec.name], seed, files)
        finally:
            for f in files:
                f.close()


def ensure_family(preset: str, seed: int = 0, force: bool = False) -> Path:
    out = family_dir(preset)
    if not force and is_current(preset, seed):
        print(f"reusing {out}")
        return out
    if out.exists():
        shutil.rmtree(out)
    params = sum(s.numel for s in make_family.tensor_specs(PRESETS[preset]))
    print(f"generating {out}: {params / 1e6:.0f}M params, {params * 2 / 1e6:.0f} MB per model, {MODELS}", flush=True)
    started = time.perf_counter()
    write_family(out, PRESETS[preset], seed)
    (out / make_family.MARKER).write_text(json.dumps(marker(preset, seed), indent=2) + "\n")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="regenerate even if a matching family exists")
    args = ap.parse_args(argv)
    ensure_family(args.preset, args.seed, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
