"""Merge methods: declarations (``catalog``, no torch) and pure tensor functions loaded on first use.

``get_method(name)`` looks a method up; its arithmetic is imported the first time it is called.
"""

from mergekitlite.methods.catalog import REGISTRY
from mergekitlite.methods.registry import (
    REQUIRED,
    ChunkInfo,
    Implementation,
    MethodSpec,
    Param,
    Range,
    Registry,
    Statistic,
)


def get_method(name: str) -> MethodSpec:
    return REGISTRY.get(name)


__all__ = [
    "REGISTRY",
    "REQUIRED",
    "ChunkInfo",
    "Implementation",
    "MethodSpec",
    "Param",
    "Range",
    "Registry",
    "Statistic",
    "get_method",
]
