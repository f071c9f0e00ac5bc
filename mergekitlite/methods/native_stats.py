"""The native per-row dot products of the Gram statistic (``mergekitlite/kernels/stats.c``), when built.

``GramStatistic`` (slerp, multislerp, karcher) sums, per row and pair of vectors, the float64 products of
float32 values by ``primitives.pairwise_sum``'s tree; the kernel forms each product as it adds it, by the
same tree in the same order, so the sums are the same bits in one pass over the chunk instead of a dozen.
Optional like the linear kernel: without a C compiler ``available()`` is False and torch computes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekitlite.methods.native import load_extension

ABI_VERSION = 1  # must equal stats.c's
MAX_VECTORS = 64


_KERNEL = load_extension("_stats", ABI_VERSION)


def available() -> bool:
    return _KERNEL is not None


def supports(vectors: Sequence[torch.Tensor]) -> bool:
    """Whether the kernel takes these vectors: float32, on the CPU, contiguous, at most 64."""
    return (
        _KERNEL is not None
        and 0 < len(vectors) <= MAX_VECTORS
        and all(v.dtype == torch.float32 and v.device.type == "cpu" and v.is_contiguous() for v in vectors)
    )


def gram_rows(vectors: Sequence[torch.Tensor], rows: int) -> torch.Tensor:
    """float64 [pairs, rows]: per row, Σ vᵢ·vⱼ for the pairs (0,0), (0,1), …, (1,1), … of ``vectors`` (each
    ``rows`` whole rows of one chunk), as ``row_sums(vᵢ.double() * vⱼ.double(), rows)`` gives them."""
    if _KERNEL is None or not supports(vectors):
        raise ValueError("the native Gram kernel takes contiguous float32 CPU vectors (and must be built)")
    numel = vectors[0].numel()
    if any(v.numel() != numel for v in vectors) or (rows and numel % rows) or (not rows and numel):
        raise ValueError(f"vectors of {[v.numel() for v in vectors]} elements are not {rows} equal rows")
    n = len(vectors)
    out = torch.empty(n * (n + 1) // 2, rows, dtype=torch.float64)
    _KERNEL.gram_rows([v.data_ptr() for v in vectors], rows, numel // rows if rows else 0, out.data_ptr())
    return out


def fiber_rank_values(magnitude: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values[r]`` for each element of a float32 [rows, n] CPU tensor of magnitudes (≥ 0), r its ascending
    rank within its row (equal magnitudes by position, NaNs above +inf): ``sparsify.by_fiber_rank`` for
    fibers along the last dim, by a radix sort instead of a comparison sort."""
    if _KERNEL is None:
        raise ValueError("the native statistics kernel is not built")
    if magnitude.dim() != 2 or magnitude.dtype != torch.float32 or magnitude.device.type != "cpu":
        raise ValueError("fiber_rank_values takes a 2-D float32 CPU tensor")
    rows, n = magnitude.shape
    values = values.to(torch.int64).contiguous()
    if values.numel() != n:
        raise ValueError(f"{values.numel()} values for fibers of {n}")
    magnitude = magnitude.contiguous()
    out = torch.empty(rows, n, dtype=torch.int64)
    _KERNEL.fiber_rank_values(magnitude.data_ptr(), rows, n, values.data_ptr(), out.data_ptr())
    return out


def variance_keys(deltas: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``sparsify.variance_key(deltas)`` (int32 keys shaped like a delta) for float32 CPU deltas, in one pass
    instead of a dozen float64 ones; None when the kernel is not built, the deltas are not contiguous float32
    CPU tensors of one shape, or some variance is NaN (its bits would depend on NaN payloads)."""
    if _KERNEL is None or not supports(deltas) or any(d.shape != deltas[0].shape for d in deltas):
        return None
    out = torch.empty(deltas[0].shape, dtype=torch.int32)
    if _KERNEL.variance_keys([d.data_ptr() for d in deltas], out.numel(), out.data_ptr()):
        return None
    return out
