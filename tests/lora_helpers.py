"""Tiny PEFT-layout adapters written with safetensors directly, and the reference LoRA arithmetic the tests
compare with (numpy, whole tensors, independent of mergekitlite.lora)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."


def peft_config(**overrides: Any) -> dict[str, Any]:
    """adapter_config.json as peft writes it for a plain LoRA (r=4, alpha=8 unless overridden)."""
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "modules_to_save": None,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    cfg.update(overrides)
    return cfg


def write_adapter(path: Path, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, bin: bool = False):
    """An adapter folder: adapter_config.json + adapter_model.safetensors (or .bin); keys get PEFT's prefix."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(dict(config), indent=2))
    named = {PREFIX + k: v.contiguous().clone() for k, v in tensors.items()}
    if bin:
        torch.save(named, path / "adapter_model.bin")
    else:
        save_file(named, str(path / "adapter_model.safetensors"))
    return path


def lora_pair(gen: torch.Generator, rows: int, cols: int, r: int, dtype=torch.float32, scale: float = 0.3):
    """(A [r, cols], B [rows, r]) with seeded values (B is not zero, unlike a fresh peft init)."""
    a = (torch.randn(r, cols, generator=gen) * scale).to(dtype)
    b = (torch.randn(rows, r, generator=gen) * scale).to(dtype)
    return a, b


def f32(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).numpy()


def lora_reference(w: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray, float, bool]]) -> np.ndarray:
    """W + Σ s·ΔW in float32, each ΔW summed over the rank k = 0, 1, ... in that order with separate float32
    multiplies and adds (the order the implementation promises). ``pairs``: (A, B, s, transposed) with
    ΔW = B·A, or (B·A)ᵀ when transposed."""
    out = w.astype(np.float32).copy()
    for a, b, s, transposed in pairs:
        left = a.T if transposed else b  # [rows, r]
        right = b.T if transposed else a  # [r, cols]
        acc = left[:, 0:1].astype(np.float32) * right[0:1, :].astype(np.float32)
        for k in range(1, left.shape[1]):
            acc = acc + left[:, k : k + 1].astype(np.float32) * right[k : k + 1, :].astype(np.float32)
        out = out + acc * np.float32(s)
    return out


def lora_reference64(w: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray, float, bool]]) -> np.ndarray:
    """The exact value W + Σ s·ΔW in float64 (matmul)."""
    out = w.astype(np.float64)
    for a, b, s, transposed in pairs:
        delta = b.astype(np.float64) @ a.astype(np.float64)
        out = out + (delta.T if transposed else delta) * np.float64(np.float32(s))
    return out


def assert_near_exact(got: np.ndarray, w: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray, float, bool]]):
    """``got`` is within float32 rounding of the exact value: each element's error at most (r + 2) float32 ulps of
    the largest magnitude its terms reach (|W| + s·Σ|B||A|)."""
    exact = lora_reference64(w, pairs)
    scale = np.abs(w.astype(np.float64))
    rank = 0
    for a, b, s, transposed in pairs:
        mag = np.abs(b.astype(np.float64)) @ np.abs(a.astype(np.float64)) * abs(s)
        scale = scale + (mag.T if transposed else mag)
        rank += a.shape[0]
    assert np.all(np.abs(got.astype(np.float64) - exact) <= (rank + 2) * 2.0**-23 * scale)
