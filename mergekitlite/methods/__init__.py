"""Merge methods: pure tensor functions behind one registry.

Importing this package registers every built-in method; ``get_method(name)`` looks one up.
"""

from mergekitlite.methods import arithmetic as _arithmetic  # noqa: F401  (registers methods)
from mergekitlite.methods import fusion as _fusion  # noqa: F401
from mergekitlite.methods import nearswap as _nearswap  # noqa: F401
from mergekitlite.methods import ram as _ram  # noqa: F401
from mergekitlite.methods import sparsify as _sparsify  # noqa: F401
from mergekitlite.methods import spherical as _spherical  # noqa: F401
from mergekitlite.methods import stock as _stock  # noqa: F401
from mergekitlite.methods.registry import (
    REGISTRY,
    REQUIRED,
    ChunkInfo,
    MethodSpec,
    Param,
    Registry,
    Statistic,
    merge_method,
)


def get_method(name: str) -> MethodSpec:
    return REGISTRY.get(name)


__all__ = [
    "REGISTRY",
    "REQUIRED",
    "ChunkInfo",
    "MethodSpec",
    "Param",
    "Registry",
    "Statistic",
    "get_method",
    "merge_method",
]
