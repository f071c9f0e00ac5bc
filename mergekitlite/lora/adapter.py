"""An adapter folder read from headers alone: its config, its weight files, and its tensors sorted by what they
do to the model's modules (PEFT's saved layout: ``base_model.model.<module>.lora_A.weight`` ...)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mergekitlite.errors import CheckpointError, ModelNotFoundError, one_line
from mergekitlite.io.safetensors_header import TensorInfo, read_header
from mergekitlite.io.torch_pickle import read_bin_index
from mergekitlite.lora.config import CONFIG_NAME, AdapterConfig, read_config

WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# Saved name endings of a module's LoRA tensors → (role, kind of LoRA).
_LORA_ENDINGS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "embA",
    ".lora_embedding_B": "embB",
    ".lora_B.bias": "bias",
}
_BASE_LAYER = ".base_layer.weight"
_UNSUPPORTED_ENDINGS = {
    ".lora_magnitude_vector": "DoRA magnitudes (lora_magnitude_vector)",
    ".lora_A.bias": "a bias on lora_A",
}


@dataclass
class LoraModule:
    """The LoRA tensors of one module, by role (A, B, embA, embB, bias)."""

    module: str
    parts: dict[str, TensorInfo] = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter:
    ref: str
    path: Path
    config: AdapterConfig
    weight_file: Path
    modules: dict[str, LoraModule]  # module path → its LoRA tensors
    base_layers: dict[str, TensorInfo]  # module path → the base weight PEFT saved with it (embedding LoRA)
    saved: dict[str, TensorInfo]  # model tensor name → the full copy (modules_to_save)

    @property
    def files(self) -> list[Path]:
        """The files that define the adapter (hashed into the output's provenance)."""
        return [self.path / CONFIG_NAME, self.weight_file]


def adapter_folder(ref: str, base_dir: Path | None) -> Path:
    """The local folder of adapter ``ref``: a folder (cwd, then the recipe's folder) or a hub id in the cache."""
    name, _, revision = ref.partition("@") if not Path(ref).expanduser().exists() else (ref, "", "")
    p = Path(name).expanduser()
    for candidate in (p, *([base_dir / p] if base_dir is not None and not p.is_absolute() else [])):
        if candidate.is_dir():
            return candidate.resolve()
    if p.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"adapter {ref!r}: no such folder")
    return _from_hub(ref, name, revision or None)


def _from_hub(ref: str, repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download

    patterns = [CONFIG_NAME, *WEIGHT_NAMES]
    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
        if (local / CONFIG_NAME).is_file():
            return local
    except Exception:  # not in the cache: try the hub below
        pass
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(
            f"adapter {ref!r} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        first = one_line(exc)
        raise ModelNotFoundError(
            f"adapter {ref!r} is not a local folder and not in the Hugging Face cache, and downloading it failed "
            f"({first})"
        ) from None


def _weight_file(path: Path, ref: str) -> Path:
    found = [path / n for n in WEIGHT_NAMES if (path / n).is_file()]
    if not found:
        raise CheckpointError(f"adapter {ref!r} ({path}): no {' or '.join(WEIGHT_NAMES)}")
    return found[0]  # safetensors first, as peft prefers it


def read_adapter(ref: str, base_dir: Path | None = None) -> Adapter:
    """Resolve ``ref``, read its config (refusing variants we do not apply) and index its tensors."""
    path = adapter_folder(ref, base_dir)
    if not (path / CONFIG_NAME).is_file():
        model = (path / "config.json").exists()
        hint = " (it looks like a full model: use it as a model, not after '+')" if model else ""
        raise CheckpointError(f"adapter {ref!r} ({path}): no {CONFIG_NAME}{hint}")
    config = read_config(path / CONFIG_NAME, ref)
    weights = _weight_file(path, ref)
    tensors = read_bin_index(weights) if weights.suffix == ".bin" else read_header(weights)[0]
    modules, base_layers, saved = _sort(tensors.values(), f"adapter {ref!r} ({weights})")
    return Adapter(ref, path, config, weights, modules, base_layers, saved)


def _sort(
    tensors: Iterable[TensorInfo], where: str
) -> tuple[dict[str, LoraModule], dict[str, TensorInfo], dict[str, TensorInfo]]:
    modules: dict[str, LoraModule] = {}
    base_layers: dict[str, TensorInfo] = {}
    saved: dict[str, TensorInfo] = {}
    for info in tensors:
        key = info.name.removeprefix(PREFIX)
        for ending, what in _UNSUPPORTED_ENDINGS.items():
            if key.endswith(ending):
                raise CheckpointError(f"{where}: {info.name}: {what} are not supported; merge it with peft first")
        role = next(((e, r) for e, r in _LORA_ENDINGS.items() if key.endswith(e)), None)
        if role is not None:
            module = key[: -len(role[0])]
            modules.setdefault(module, LoraModule(module)).parts[role[1]] = info
        elif key.endswith(_BASE_LAYER):
            base_layers[key[: -len(_BASE_LAYER)]] = info
        elif ".lora_" in key:
            raise CheckpointError(f"{where}: {info.name}: not a LoRA tensor we know (an adapter name in the key?)")
        else:
            saved[key] = info
    return modules, base_layers, saved
