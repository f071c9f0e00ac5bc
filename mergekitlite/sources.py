"""Resolve model references to local folders and index their tensors from headers alone.

A reference is a local folder (absolute, or relative to the working directory, then to the
recipe's folder) or a Hugging Face hub id, optionally ``id@revision``, found in the
huggingface_hub cache or downloaded into it. Nothing here reads weights.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mergekitlite.errors import CheckpointError, ModelNotFoundError, one_line
from mergekitlite.io.inputs import input_error, read_text_input
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

    def input_files(self) -> list[Path]:
        """Every file the merge reads weights from (an adapted model adds its adapter's)."""
        return list(self.weight_files)

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

    incomplete = ""
    try:
        local = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        found = _weight_files(local)
        if found.files and not found.missing:
            return local
        if found.missing:
            incomplete = f" (the cached copy in {local} lacks {', '.join(found.missing)})"
    except LocalEntryNotFoundError:
        pass
    except Exception as exc:  # e.g. a malformed cache folder
        raise ModelNotFoundError(f"model {ref!r}: the Hugging Face cache entry is unusable: {exc}") from None

    hint = (
        f"download it first (`hf download {repo_id}` on a machine with network access), or point "
        "the recipe at a local folder"
    )
    if incomplete:
        where = "is in the Hugging Face cache but incomplete" + incomplete
    else:
        where = "is not a local folder and not in the Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(f"model {ref!r} {where} ({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set: {hint}")
    unreachable = _hub_unreachable(constants.ENDPOINT)
    if unreachable:
        raise ModelNotFoundError(
            f"model {ref!r} {where} ({constants.HF_HUB_CACHE}), and the hub cannot be reached ({unreachable}): {hint}"
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
            f"model {ref!r} {where} ({constants.HF_HUB_CACHE}), and downloading it failed ({type(exc).__name__}: "
            f"{one_line(exc)}): {hint}"
        ) from None


@dataclass
class _WeightFiles:
    files: list[Path]  # what the folder's index (or listing) names, in order
    missing: list[str] = field(default_factory=list)  # those of ``files`` that are not there (dangling links...)


def _shard_names(index: Path) -> list[str]:
    """The shard file names an index names, each checked to be a file inside the model folder."""
    try:
        data = json.loads(read_text_input(index))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{index}: not a valid index ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid index: 'weight_map' must map tensor names to shard file names")
    names = sorted(set(weight_map.values()))
    for name in names:
        rel = PurePosixPath(name)
        # Checked on the name, not the resolved path: hub snapshots are symlinks into ../../blobs.
        if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name:
            raise CheckpointError(
                f"{index}: names the shard {name!r}, which is not a file of the model folder; an index may only "
                "name files next to it (is the index from another model, or tampered with?)"
            )
    return names


def _describe_missing(path: Path) -> str:
    if os.path.islink(path):
        return f"{path.name} (a symbolic link to {os.readlink(path)}, which does not exist)"
    return path.name


def _present(files: list[Path]) -> _WeightFiles:
    return _WeightFiles(files, [_describe_missing(f) for f in files if not f.is_file()])


def _from_index(folder: Path, index: Path) -> _WeightFiles:
    return _present([folder / name for name in _shard_names(index)])


def _list_folder(folder: Path) -> set[str]:
    """Names in ``folder``; unlike ``glob``, an unreadable folder is an error, not an empty one."""
    try:
        return {entry.name for entry in os.scandir(folder)}
    except OSError as exc:
        raise input_error(exc, folder) from None


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


def _weight_files(folder: Path) -> _WeightFiles:
    """The weight files of a model folder: safetensors preferred, pickled .bin otherwise."""
    names = _list_folder(folder)
    if "model.safetensors.index.json" in names:
        return _from_index(folder, folder / "model.safetensors.index.json")
    files = sorted(folder / n for n in names if n.endswith(".safetensors") and not n.startswith("adapter_"))
    if files:
        return _present(files)
    if "pytorch_model.bin.index.json" in names:
        return _from_index(folder, folder / "pytorch_model.bin.index.json")
    return _present(sorted(folder / n for n in names if fnmatch.fnmatchcase(n, "pytorch_model*.bin")))


def _find_weight_files(folder: Path) -> list[Path]:
    found = _weight_files(folder)
    if found.missing:
        raise CheckpointError(
            f"{folder}: weight file(s) missing: {', '.join(found.missing)} (an incomplete download or copy? "
            "fetch them again)"
        )
    if found.files:
        return found.files
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


def _read_config(config_path: Path) -> dict[str, Any]:
    if not os.path.lexists(config_path):
        return {}
    try:
        config = json.loads(read_text_input(config_path))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{config_path}: a JSON {type(config).__name__}, not an object; a model's config.json maps settings to "
            "values (is this the right file?)"
        )
    return config


def index_model(ref: str, path: Path, from_hub: bool = False) -> ModelSource:
    """Read config.json and every shard header of the model at ``path``."""
    config = _read_config(path / "config.json")
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
        except OSError as exc:  # e.g. a folder on the way that this user may not enter
            problem = input_error(exc, Path(ref))
            if not isinstance(problem, CheckpointError):
                raise
            problems.append(f"model {ref!r}: {problem}")
    return sources, problems
