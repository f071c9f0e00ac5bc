"""Short unique labels for long names in narrow tables (model paths, module names)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def unique_suffixes(
    names: Sequence[str], sep: str, *, min_parts: Callable[[list[str]], int] | None = None
) -> dict[str, str]:
    """Each name's shortest ``sep``-separated suffix that no other name ends with (the whole name
    when every suffix is shared). ``min_parts(parts)``: how many parts a label needs at least."""
    parts = {n: [p for p in n.split(sep) if p] or [n] for n in names}
    labels: dict[str, str] = {}
    for name, mine in parts.items():
        first = min(min_parts(mine) if min_parts else 1, len(mine))
        for k in range(first, len(mine) + 1):
            label = sep.join(mine[-k:])
            shared = any(other != name and sep.join(theirs[-k:]) == label for other, theirs in parts.items())
            if not shared or k == len(mine):
                labels[name] = label
                break
    return labels


def path_labels(paths: Sequence[str]) -> dict[str, str]:
    """``demo/models/chat`` → ``chat``; ``a/x/model`` and ``b/x/model`` → ``a/x/model`` and ``b/x/model``."""
    return unique_suffixes(paths, "/")


def module_labels(modules: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each module name (without ``.weight``) that is still unique:
    ``self_attn.q_proj.weight`` → ``q_proj``, but Qwen v1's ``attn.c_proj`` and ``mlp.c_proj`` stay
    apart, and a bias keeps the name of its module (``c_attn.bias``: "bias" alone says nothing)."""
    stripped = {m.removesuffix(".weight"): m for m in modules}
    labels = unique_suffixes(
        list(stripped), ".", min_parts=lambda parts: 2 if parts[-1] == "bias" and len(parts) > 1 else 1
    )
    return {stripped[s]: label for s, label in labels.items()}
