"""Resolve model references to local folders and index their tensors from headers alone.

A reference is a local folder (absolute, or relative to the working directory, then to the
recipe's folder) or a Hugging Face hub id, optionally ``id@revision``, found in the
huggingface_hub cache or downloaded into it. Nothing here reads weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekitlite.errors import CheckpointError, ModelNotFoundError
from mergekitlite.io.safetensors_header import TensorInfo, read_header
from mergekitlite.io.torch_pickle import read_bin_index
from mergekitlite.lora.reference import adapter_parts
from mergekitlite.roles import split_layer

# Files a merge needs besides weights; everything else in a hub repo is not downloaded.
SIDE_FILE_PATTERNS = [
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.py",
    "*.jinja",
    "tokenizer*",
]


@dataclass
class ModelSource:
    """A resolved model: its folder, config.json and a header-only index of its tensors."""

    ref: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    weight_files: list[Path]
    from_hub: bool = False
    layer_counts: dict[str, int] = field(default_factory=dict)  # layer prefix → number of layers

    @property
    def label(self) -> str:
        return self.ref

    def main_layer_prefix(self) -> str | None:
        """The prefix with the most layers (the decoder stack)."""
        if not self.layer_counts:
            return None
        return max(self.layer_counts, key=lambda p: (self.layer_counts[p], -len(p)))

    def config_value(self, *keys: str) -> Any:
        for cfg in (self.config, self.config.get("text_config") or {}):
            for k in keys:
                if k in cfg:
                    return cfg[k]
        return None

    @property
    def tied_embeddings(self) -> bool:
        tied = self.config_value("tie_word_embeddings")
        # transformers' PretrainedConfig defaults to True when the key is absent.
        return True if tied is None else bool(tied)

    def side_files(self) -> list[Path]:
        weights = set(self.weight_files)
        return sorted(p for p in self.path.iterdir() if p.is_file() and p not in weights)


def split_revision(ref: str) -> tuple[str, str | None]:
    if "@" in ref and not Path(ref).expanduser().exists():
        path, rev = ref.rsplit("@", 1)
        return path, rev or None
    return ref, None


def _looks_like_path(ref: str) -> bool:
    """Hub ids are 'org/name'; anything else can only be meant as a folder. (Legacy ids without an
    organisation, like 'gpt2', now redirect from 'openai-community/gpt2': a bare word is far more
    likely a mistyped folder, which deserves a quick, clear error rather than a network lookup.)"""
    return ref.startswith((".", "/", "~")) or ref.count("/") != 1 or "\\" in ref


def resolve_model_path(ref: str, base_dir: Path | None = None) -> tuple[Path, bool]:
    """(local folder, came-from-hub) for ``ref``; raises ModelNotFoundError with what was tried."""
    name, revision = split_revision(ref)
    p = Path(name).expanduser()
    tried = [p if p.is_absolute() else Path.cwd() / p]
    if p.is_dir():
        return p.resolve(), False
    if not p.is_absolute() and base_dir is not None:
        q = base_dir / p
        if q not in tried:
            tried.append(q)
        if q.is_dir():
            return q.resolve(), False
    if p.exists():
        raise ModelNotFoundError(f"model {ref!r}: {p} is a file; expected a model folder")
    if _looks_like_path(name):
        where = " or ".join(str(t) for t in tried)
        hint = " (a hub model is written 'org/name')" if "/" not in name else ""
        raise ModelNotFoundError(f"model {ref!r}: no such folder ({where}){hint}")
    return _from_hub(ref, name, revision), True


def _from_hub(ref: str, repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        if _find_weight_files(local, missing_ok=True):
            return local
    except LocalEntryNotFoundError:
        pass
    except Exception as exc:  # e.g. a malformed cache folder
        raise ModelNotFoundError(f"model {ref!r}: the Hugging Face cache entry is unusable: {exc}") from None

    hint = (
        f"download it first (`hf download {repo_id}` on a machine with network access), or point "
        "the recipe at a local folder"
    )
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(
            f"model {ref!r} is not a local folder and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set: {hint}"
        )
    unreachable = _hub_unreachable(constants.ENDPOINT)
    if unreachable:
        raise ModelNotFoundError(
            f"model {ref!r} is not a local folder and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and the hub cannot be reached ({unreachable}): {hint}"
        )
    try:
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(repo_id, revision=revision)
        weights = [f for f in files if f.endswith(".safetensors")]
        if not weights:
            weights = [f for f in files if f.endswith(".bin") and "pytorch_model" in f]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=[*SIDE_FILE_PATTERNS, *weights]))
    except Exception as exc:
        raise ModelNotFoundError(
            f"model {ref!r} is not a local folder and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and downloading it failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no message'}): {hint}"
        ) from None


def _from_index(folder: Path, index: Path, missing_ok: bool) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid index ({exc})") from None
    files = sorted({folder / f for f in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing and not missing_ok:
        raise CheckpointError(
            f"{folder}: the index names shard(s) that are not there: {', '.join(missing)} (an incomplete download?)"
        )
    return [] if missing else files


def _hub_unreachable(endpoint: str) -> str | None:
    """A reason the hub cannot be reached, found in a few seconds; huggingface_hub itself would
    retry with backoff for half a minute before saying so."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy decides reachability; let huggingface_hub try
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=5):
            return None
    except OSError as exc:
        return f"{url.hostname}: {exc.strerror or exc}"


def _find_weight_files(folder: Path, missing_ok: bool = False) -> list[Path]:
    """The weight files of a model folder: safetensors preferred, pickled .bin otherwise."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return _from_index(folder, index, missing_ok)
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if files:
        return files
    bin_index = folder / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        return _from_index(folder, bin_index, missing_ok)
    files = sorted(folder.glob("pytorch_model*.bin"))
    if files or missing_ok:
        return files
    if (folder / "adapter_config.json").exists():
        raise CheckpointError(f"{folder}: this is a LoRA adapter, not a full model; merge it into its base first")
    raise CheckpointError(f"{folder}: no weights found (*.safetensors or pytorch_model*.bin)")


def _count_layers(names: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        parts = split_layer(name)
        if parts:
            prefix, idx, _ = parts
            counts[prefix] = max(counts.get(prefix, 0), idx + 1)
    return counts


def index_model(ref: str, path: Path, from_hub: bool = False) -> ModelSource:
    """Read config.json and every shard header of the model at ``path``."""
    config_path = path / "config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from None
    files = _find_weight_files(path)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        found = read_bin_index(f) if f.suffix == ".bin" else read_header(f)[0]
        for name, info in found.items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} is stored twice ({tensors[name].file.name}, {f.name})")
            tensors[name] = info
    # Reading in file order keeps input access sequential.
    ordered = dict(sorted(tensors.items(), key=lambda kv: (str(kv[1].file), kv[1].begin)))
    return ModelSource(
        ref=ref,
        path=path,
        config=config,
        tensors=ordered,
        weight_files=files,
        from_hub=from_hub,
        layer_counts=_count_layers(ordered),
    )


def open_sources(
    refs: Iterable[str], base_dir: Path | None = None, aliases: Mapping[str, Path] | None = None
) -> tuple[dict[str, ModelSource], list[str]]:
    """Resolve and index every ref; returns sources and *all* problems (not just the first).
    ``aliases`` maps names of earlier merge steps to their output folders."""
    sources: dict[str, ModelSource] = {}
    problems: list[str] = []
    for ref in refs:
        try:
            if adapter_parts(ref, base_dir) is not None:  # model+adapter: the adapter applied on read (lora/)
                from mergekitlite.lora.source import open_adapted

                sources[ref] = open_adapted(ref, base_dir, aliases)
                continue
            if aliases and ref in aliases:
                if not aliases[ref].is_dir():
                    raise ModelNotFoundError(f"model {ref!r}: the result of step {ref!r} is not there ({aliases[ref]})")
                path, hub = aliases[ref], False
            else:
                path, hub = resolve_model_path(ref, base_dir)
            sources[ref] = index_model(ref, path, hub)
        except (ModelNotFoundError, CheckpointError) as exc:
            problems.append(str(exc))
    return sources, problems
