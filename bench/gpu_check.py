"""The CUDA path on a real GPU, in one short run: outputs bit-identical to the CPU path, VRAM held
under --max-vram, and timings of CPU vs GPU on the same machine.

    python bench/gpu_check.py --out RESULTS_DIR          # on a machine with a GPU

Generates a bf16 Llama-layout family (bench/make_family.py: the 1.3b preset's sizes with ``--layers``
layers, base + two noisy fine-tunes), merges it with several methods on ``cpu`` and on ``cuda`` through
the Python API, compares every output tensor bitwise (bench/compare.py), and writes ``gpu_check.json``
and ``gpu_check.md`` into RESULTS_DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import compare
import make_family
import torch

from mergekitlite import MergeOptions, plan_merge, run_merge
from mergekitlite.budget import parse_size

METHODS = {
    "task_arithmetic": "merge_method: task_arithmetic\nparameters: {normalize: false}\n",
    "ties": "merge_method: ties\nparameters: {density: 0.5, normalize: true}\n",
    "dare_ties": "merge_method: dare_ties\nparameters: {density: 0.5}\nrandom_seed: 7\n",
    "slerp": "merge_method: slerp\nparameters: {t: [0.2, 0.8]}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nparameters: {density: 0.9, gamma: 0.01}\n",
    "della": "merge_method: della\nparameters: {density: 0.5, epsilon: 0.1}\nrandom_seed: 7\n",
    "sce": "merge_method: sce\nparameters: {select_topk: 0.5}\n",
    "model_stock": "merge_method: model_stock\n",
    "multislerp": "merge_method: multislerp\n",
    "arcee_fusion": "merge_method: arcee_fusion\n",
}
ONE_MODEL = {"slerp", "arcee_fusion"}


def recipe(fam: dict[str, Path], method: str) -> str:
    head = METHODS[method]
    if method in ONE_MODEL:
        models = f"models:\n  - model: {fam['ft1']}\n"
    else:
        models = "".join(f"  - model: {fam[m]}\n    parameters: {{weight: 0.5}}\n" for m in ("ft1", "ft2"))
        models = "models:\n" + models
    return f"{head}base_model: {fam['base']}\n{models}dtype: bfloat16\n"


def same_weights(a: Path, b: Path) -> tuple[bool, int]:
    rep = compare.compare(a, b)
    differing = rep.agreement.elements - rep.agreement.bitwise_equal
    return differing == 0 and not (rep.missing_in_a or rep.missing_in_b or rep.mismatched), differing


def timed(recipe_path: Path, out: Path, opts: MergeOptions) -> tuple[float, int]:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    run_merge(recipe_path, out, opts)
    wall = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return wall, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mkl-gpu"))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--max-vram", default="2GB")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # The 1.3b preset's sizes with --layers layers; deltas 10% of the weights' std.
    family = make_family.Family(dataclasses.replace(make_family.PRESETS["1.3b"].sizes, layers=args.layers), noise=0.1)
    root = make_family.ensure_family(family, args.work / "family")
    fam = {m: root / m for m in family.models}
    report: dict[str, object] = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "max_vram": args.max_vram,
        "methods": {},
    }
    for method in args.methods.split(","):
        path = args.work / f"{method}.yaml"
        path.write_text(recipe(fam, method))
        row: dict[str, object] = {}
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            opts = MergeOptions(
                device=device,
                overwrite=True,
                hash_inputs=False,
                max_vram=parse_size(args.max_vram) if device == "cuda" else None,
            )
            runs = [timed(path, args.work / f"out-{method}-{device}", opts) for _ in range(args.repeat)]
            row[device] = {
                "wall_median_s": statistics.median(r[0] for r in runs),
                "walls_s": [r[0] for r in runs],
                "peak_vram_bytes": max(r[1] for r in runs),
                # what the planner expected (chunks sized from each method's declared working space)
                "estimated_peak_vram_bytes": plan_merge(path, opts).estimated_peak_vram() if device == "cuda" else 0,
            }
        if "cuda" not in row:
            print(method, json.dumps(row), flush=True)
            continue
        ok, differing = same_weights(args.work / f"out-{method}-cpu", args.work / f"out-{method}-cuda")
        row["bitwise_equal"] = ok
        row["differing_elements"] = differing
        report["methods"][method] = row  # type: ignore[index]
        print(method, json.dumps(row), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    if not torch.cuda.is_available():
        return
    lines = [
        f"GPU {report['gpu']}, torch {report['torch']}, {report['cpus']} CPUs, --max-vram {args.max_vram}",
        "",
        "| method | cpu median (s) | cuda median (s) | peak VRAM (MB) | planner's estimate (MB) | within --max-vram "
        "| cpu == cuda bitwise |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for method, row in report["methods"].items():  # type: ignore[union-attr]
        lines.append(
            f"| {method} | {row['cpu']['wall_median_s']:.2f} | {row['cuda']['wall_median_s']:.2f} | "
            f"{row['cuda']['peak_vram_bytes'] / 1e6:.0f} | {row['cuda']['estimated_peak_vram_bytes'] / 1e6:.0f} | "
            f"{row['cuda']['peak_vram_bytes'] <= parse_size(args.max_vram)} | "
            f"{row['bitwise_equal']} ({row['differing_elements']} differ) |"
        )
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
