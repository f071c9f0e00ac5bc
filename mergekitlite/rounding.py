"""One correct rounding from float64 to the output's dtype (torch's own conversion rounds twice)."""

from __future__ import annotations

import torch


def narrow_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` with a single correct rounding also from float64 to bf16/fp16.

    torch converts float64 → bf16 through float32, rounding twice: a value just above a bf16
    midpoint can land on the midpoint in float32 and then round to even, the wrong way. Rounding to
    float32 *to odd* first (truncate, then set the last bit when inexact) keeps the information that
    the value was not on the midpoint; float32 has more than 2·p + 2 bits for both targets, so the
    second rounding is then exact (Boldo & Melquiond's double rounding theorem)."""
    if x.dtype != torch.float64 or dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)
    nearest = x.to(torch.float32)
    back = nearest.to(torch.float64)
    inexact = back != x
    bits = nearest.view(torch.int32)
    # Where rounding went away from zero, one step back toward zero (sign-magnitude: bits − 1).
    bits = torch.where(inexact & (back.abs() > x.abs()), bits - 1, bits)
    bits = torch.where(inexact, bits | 1, bits)
    return bits.view(torch.float32).to(dtype)
