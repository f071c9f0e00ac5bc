"""Evaluate one parameter setting for one tensor: scalars, gradients over layers, filtered rules.

Semantics follow mergekit so published recipes give the same numbers:

* a scalar is used as is;
* a gradient ``[v0, v1, ..., vk]`` is interpolated linearly at ``t`` ∈ [0, 1], where layer ``i``
  of ``n`` has ``t = i / (n - 1)`` (``t = 1`` when ``n == 1``) and tensors outside the layers
  (embeddings, final norm, lm_head) have ``t = 0``;
* a list of ``{filter, value}`` rules takes the first rule whose filter matches the tensor name;
  when none matches, the setting is absent at this level and the next level is consulted.

Filters: a plain string matches as a substring (mergekit), a string with ``* ? [`` as a glob over
the whole name, ``re:...`` as a regular expression searched in the name.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from mergekitlite.recipe import ConditionalParameter

_GLOB_CHARS = frozenset("*?[")


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def name_matches(pattern: str | None, name: str) -> bool:
    if pattern is None or pattern == "*":
        return True
    if pattern.startswith("re:"):
        return _regex(pattern[3:]).search(name) is not None
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def interpolate(gradient: Sequence[float], t: float) -> float:
    scaled = t * (len(gradient) - 1)
    i0 = int(scaled)
    i1 = min(len(gradient) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * gradient[i0] + frac * gradient[i1]


def is_gradient(setting: Any) -> bool:
    if isinstance(setting, ConditionalParameter):
        return is_gradient(setting.value)
    if isinstance(setting, list):
        if setting and isinstance(setting[0], ConditionalParameter):
            return any(is_gradient(rule) for rule in setting)
        return True
    return False


def evaluate(setting: Any, tensor_name: str, t: float) -> Any | None:
    """The value of ``setting`` for ``tensor_name`` at layer position ``t``, or None if no rule matches."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, list):
        if setting and isinstance(setting[0], ConditionalParameter):
            for rule in setting:
                if name_matches(rule.filter, tensor_name):
                    return evaluate(rule.value, tensor_name, t)
            return None
        if setting and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return interpolate(setting, t)
    raise TypeError(f"unexpected parameter setting {setting!r}")
