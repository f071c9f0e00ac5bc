"""LoRA extraction, mergekitlite vs mergekit: wall time, whole-process peak RSS, reconstruction error.

Both tools extract ``ft1 − base`` of a generated family (``bench/make_family.py``) at the same rank, with the
embeddings saved whole (both tools' default), into bf16 adapters (the models' dtype). The error is computed
here, the same way for both adapters, from the files they wrote: per decomposed module
‖ΔW − s·B·A‖_F / ‖ΔW‖_F in float64 (s from each adapter_config.json), and over all modules together.

    python bench/lora_bench.py --preset tiny            # a quick check of the harness
    python bench/lora_bench.py --preset 1.3b --rank 32  # the real numbers (a quiet machine, please)

mergekit runs from its own venv (``/work/mkvenv/bin/mergekit-extract-lora``); without it only mergekitlite is
measured. Results: ``bench/.work/lora_bench-PRESET.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from pathlib import Path

import torch
from make_family import WORK, ensure_family
from procstats import run_measured
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
MERGEKIT_EXTRACT = Path("/work/mkvenv/bin/mergekit-extract-lora")
PREFIX = "base_model.model."


def _tensors(folder: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: (f, k) for k in sf.keys()})  # noqa: SIM118 - safe_open is not a mapping
    return out


def _get(where: tuple[Path, str]) -> torch.Tensor:
    with safe_open(str(where[0]), framework="pt") as sf:
        return sf.get_tensor(where[1])


def _scale(cfg: dict, module: str) -> float:
    """peft's scale for ``module``: alpha/r with rank_pattern / alpha_pattern (first pattern matching the end)."""

    def pick(patterns: dict, default: float) -> float:
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
        return float(patterns[key]) if key is not None else float(default)

    r = pick(cfg.get("rank_pattern") or {}, cfg["r"])
    alpha = pick(cfg.get("alpha_pattern") or {}, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def reconstruction(adapter: Path, ft: Path, base: Path) -> dict[str, object]:
    """Per module and overall ‖ΔW − s·B·A‖ / ‖ΔW‖ of the adapter in ``adapter`` (float64)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    factors = _tensors(adapter)
    ft_t, base_t = _tensors(ft), _tensors(base)
    per_module, err2, norm2 = {}, 0.0, 0.0
    for key in sorted(k for k in factors if k.endswith(".lora_A.weight")):
        module = key[len(PREFIX) : -len(".lora_A.weight")]
        a = _get(factors[key]).double()
        b = _get(factors[key.replace("lora_A", "lora_B")]).double()
        delta = _get(ft_t[module + ".weight"]).double() - _get(base_t[module + ".weight"]).double()
        e = float(torch.linalg.matrix_norm(delta - _scale(cfg, module) * (b @ a)))
        n = float(torch.linalg.matrix_norm(delta))
        per_module[module] = {"rank": a.shape[0], "rel_error": e / n if n else 0.0}
        err2, norm2 = err2 + e * e, norm2 + n * n
    return {"overall_rel_error": math.sqrt(err2 / norm2) if norm2 else 0.0, "modules": per_module}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--mergekit-bin", type=Path, default=MERGEKIT_EXTRACT)
    args = ap.parse_args(argv)
    family = ensure_family(args.preset)
    ft, base = family / "ft1", family / "base"
    work = WORK / f"lora-{args.preset}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    runs = {
        "mergekitlite": [
            str(Path(sys.executable).with_name("mergekitlite")),
            "extract-lora",
            str(ft),
            "--base",
            str(base),
            "--rank",
            str(args.rank),
            str(work / "mergekitlite"),
            "-q",
        ]
    }
    if args.mergekit_bin.exists():
        runs["mergekit"] = [
            str(args.mergekit_bin),
            "--model",
            str(ft),
            "--base-model",
            str(base),
            "--out-path",
            str(work / "mergekit"),
            "--max-rank",
            str(args.rank),
        ]
    else:
        print(f"note: {args.mergekit_bin} not found; measuring mergekitlite only")
    results = {}
    for label, cmd in runs.items():
        stats = run_measured(label, cmd, work / f"{label}.log")
        if stats.returncode != 0:
            print((work / f"{label}.log").read_text()[-3000:])
            raise SystemExit(f"{label} failed (exit {stats.returncode}); log: {work / f'{label}.log'}")
        results[label] = stats.as_dict() | {"reconstruction": reconstruction(work / label, ft, base)}
    print(f"{'tool':<14}{'wall s':>9}{'peak RSS GB':>13}{'error (all)':>13}{'modules':>9}")
    for label, r in results.items():
        rec = r["reconstruction"]
        print(
            f"{label:<14}{r['wall_s']:>9.2f}{r['peak_rss'] / 1e9:>13.2f}"
            f"{rec['overall_rel_error']:>13.6f}{len(rec['modules']):>9}"
        )
    out = WORK / f"lora_bench-{args.preset}.json"
    out.write_text(json.dumps({"preset": args.preset, "rank": args.rank, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
