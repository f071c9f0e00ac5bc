"""mergekit's half of bench/tiebreak.py: its top-k masks, made by its own functions, as packed bits.

Runs in mergekit's venv (``/work/mkvenv/bin/python bench/tiebreak_mergekit.py --family F --tensors A,B
--jobs JSON --out DIR``); bench/tiebreak.py starts it. Only ``load_family_tensor`` is shared with that
script, so mergekit is imported inside ``main`` and this module imports without it.

The deltas are the ones mergekit's bf16 merge sees: ``generalized_task_arithmetic.merge_group`` and
``sce_merge`` compute ``entry.tensor - base`` in the merge dtype, bf16 for ``dtype: bfloat16`` over bf16
checkpoints (every input is cast to it first). The TIES/Breadcrumbs masks are those ``mergekit.sparsify``
builds (``sparsify()`` → ``magnitude`` / ``magnitude_outliers``), captured where it hands them to
``rescaled_masked_tensor`` (its result δ·mask cannot tell a kept zero from a dropped one); SCE's is
``merge_methods.sce.sce_mask``'s return value. Each mask is written as ``DIR/<tensor>__<job>__<model>.npy``
(``np.packbits`` of the flat mask) with a ``.json`` beside it: mergekit's k and its threshold magnitude.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

MODELS = ("base", "ft1", "ft2")


def load_family_tensor(family: Path, model: str, name: str) -> torch.Tensor:
    """One tensor of one model of a family (sharded safetensors with an index), as stored."""
    index = json.loads((family / model / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(family / model / index[name]), "pt") as f:
        return f.get_tensor(name)


def save_mask(out: Path, stem: str, mask: torch.Tensor, info: dict[str, Any]) -> None:
    np.save(out / f"{stem}.npy", np.packbits(mask.reshape(-1).numpy()))
    (out / f"{stem}.json").write_text(json.dumps(info))


def gta_masks(deltas: list[torch.Tensor], job: dict[str, Any]) -> list[torch.Tensor]:
    """Each model's mask from mergekit's ``sparsify`` (as merge_group calls it), captured on its way in."""
    import mergekit.sparsify as mks

    captured: list[torch.Tensor] = []
    original = mks.rescaled_masked_tensor

    def capture(tensor: torch.Tensor, mask: torch.Tensor, norm: Any, eps: float = 1e-7) -> torch.Tensor:
        captured.append(mask != 0)
        return original(tensor, mask, norm, eps)

    method = {"ties": mks.SparsificationMethod.magnitude, "breadcrumbs": mks.SparsificationMethod.magnitude_outliers}
    extra = {"gamma": job["gamma"]} if job["method"] == "breadcrumbs" else {}
    mks.rescaled_masked_tensor = capture
    try:
        for delta in deltas:
            mks.sparsify(delta, density=job["density"], method=method[job["method"]], rescale_norm=None, **extra)
    finally:
        mks.rescaled_masked_tensor = original
    assert len(captured) == len(deltas)
    return captured


def sce_mask(deltas: list[torch.Tensor], job: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """SCE's selection as ``sce_merge`` makes it (mask dtype = the base's, bf16), with its k and the
    variance it ranks (bf16: torch.var of bf16 task vectors)."""
    from mergekit.merge_methods.sce import sce_mask as mk_sce_mask

    stacked = torch.stack(deltas, dim=0)
    mask = mk_sce_mask(stacked, job["density"], torch.bfloat16) != 0
    var = torch.var(stacked, dim=0, unbiased=False)  # what sce_mask ranks, for the threshold report
    k = int(torch.count_nonzero(var) * job["density"])
    return mask, {"k": k, "var_dtype": str(var.dtype)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", type=Path, required=True)
    ap.add_argument("--tensors", required=True, help="comma-separated tensor names")
    ap.add_argument("--jobs", required=True, help="JSON list of {name, method, density, gamma}")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = json.loads(args.jobs)
    for name in args.tensors.split(","):
        base, *models = (load_family_tensor(args.family, m, name) for m in MODELS)
        deltas = [m - base for m in models]  # bf16 - bf16 in bf16, as mergekit's merge_group
        for job in jobs:
            if job["method"] == "sce":
                mask, info = sce_mask(deltas, job)
                save_mask(args.out, f"{name}__{job['name']}__0", mask, info)
                continue
            for i, mask in enumerate(gta_masks(deltas, job)):
                save_mask(args.out, f"{name}__{job['name']}__{i}", mask, {"k": int(mask.sum())})
        print(f"mergekit masks: {name}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
