"""The native per-row dot products of the Gram statistic (``mergekitlite/kernels/gram.c``), when built.

``GramStatistic`` (slerp, multislerp, karcher) sums, per row and pair of vectors, the float64 products of
float32 values by ``primitives.pairwise_sum``'s tree; the kernel forms each product as it adds it, by the
same tree in the same order, so the sums are the same bits in one pass over the chunk instead of a dozen.
Optional like the linear kernel: without a C compiler ``available()`` is False and torch computes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

ABI_VERSION = 1  # must equal gram.c's
MAX_VECTORS = 64


def _load() -> ModuleType | None:
    try:
        from mergekitlite import _gram  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _gram if getattr(_gram, "ABI_VERSION", None) == ABI_VERSION else None


_KERNEL = _load()


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
