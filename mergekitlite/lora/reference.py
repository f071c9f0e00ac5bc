"""``model+adapter`` references, as mergekit writes them: ``org/model+org/adapter`` (each part may carry
``@revision``). A local folder whose name contains ``+`` is a model, not a pair. Imports no torch."""

from __future__ import annotations

from pathlib import Path


def adapter_parts(ref: str, base_dir: Path | None = None) -> tuple[str, str] | None:
    """``(model, adapter)`` when ``ref`` names a model with an adapter, else None. Raises ValueError for a
    reference with more than one ``+`` or an empty side (mergekit refuses those too)."""
    if "+" not in ref or _is_folder(ref, base_dir):
        return None
    parts = ref.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(f"{ref!r}: expected 'model+adapter' (one '+' between a model and a LoRA adapter)")
    return parts[0].strip(), parts[1].strip()


def _is_folder(ref: str, base_dir: Path | None) -> bool:
    p = Path(ref).expanduser()
    return p.exists() or (base_dir is not None and not p.is_absolute() and (base_dir / p).exists())
