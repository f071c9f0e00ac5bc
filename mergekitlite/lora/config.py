"""An adapter's ``adapter_config.json``, read as PEFT reads it: what it targets, each module's rank, alpha and
scale, and the variants we do not apply (refused with the setting named, never approximated)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekitlite.errors import CheckpointError

CONFIG_NAME = "adapter_config.json"

# Settings that change what merging an adapter means; any true / non-empty value is refused.
_REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA) rescales each column by a learned magnitude",
    "layer_replication": "it duplicates layers of the model",
    "megatron_config": "Megatron-parallel LoRA layers",
    "trainable_token_indices": "trainable-token deltas",
    "target_parameters": "LoRA on bare parameters (MoE experts)",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens, so it cannot be merged",
    "use_qalora": "QA-LoRA pools its input groups",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing between several LoRAs",
}
_LINEAR_SHORTHAND = "all-linear"


def _refuse(where: str, setting: str, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: {setting} is not supported ({why}); merge this adapter with peft first")


@dataclass(frozen=True)
class AdapterConfig:
    """The settings of ``adapter_config.json`` that decide what merging the adapter does."""

    where: str  # "adapter REF (PATH/adapter_config.json)", for messages
    r: int
    alpha: float
    rslora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] = ()
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------ which modules PEFT wraps
    def targets(self, module: str, *, is_head: bool = False) -> bool:
        """Whether PEFT would put a LoRA layer on ``module`` (peft.tuners.tuners_utils.check_target_module_exists)."""
        if self.exclude_modules is not None and _matches(self.exclude_modules, module):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save):
            return False
        if self.target_modules is None:
            return False
        if isinstance(self.target_modules, str):
            if self.target_modules.lower() == _LINEAR_SHORTHAND:
                return not is_head  # every linear layer but the output head (we cannot see module types)
            return re.fullmatch(self.target_modules, module) is not None
        if not _matches(self.target_modules, module):
            return False
        if self.layers_to_transform is None:
            return True
        return self._layer_index(module) in self.layers_to_transform

    def _layer_index(self, module: str) -> int | None:
        if not self.layers_pattern:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            m = next(
                (x for p in self.layers_pattern if (x := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None
            )
        return int(m["idx"]) if m else None

    def saves(self, module: str) -> bool:
        """Whether ``module`` is a full copy PEFT restores (``modules_to_save``: a suffix of the module path)."""
        return any(module.endswith(m) for m in self.modules_to_save)

    # ------------------------------------------------------------ rank and scale per module
    def rank(self, module: str) -> int:
        return int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r))

    def scale(self, module: str) -> float:
        """lora_alpha / r, or lora_alpha / √r with use_rslora (peft.tuners.lora.layer.LoraLayer.update_layer)."""
        r = self.rank(module)
        alpha = float(self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.alpha))
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def _matches(names: str | tuple[str, ...], module: str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return module in names or any(module.endswith(f".{n}") for n in names)


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str:
    """peft.utils.other.get_pattern_key: the first pattern that matches the end of the module path."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), module)


def _names(value: Any, where: str, key: str) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise CheckpointError(f"{where}: {key} must be a string or a list of strings, got {value!r}")


def read_config(path: Path, ref: str) -> AdapterConfig:
    """Parse and check ``path`` (an adapter_config.json); CheckpointError names the adapter and the setting."""
    where = f"adapter {ref!r} ({path})"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: unreadable ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise _refuse(where, f"peft_type: {peft_type!r}", "only LoRA adapters (peft_type: LORA) can be applied")
    for key, why in _REFUSED.items():
        if raw.get(key):
            raise _refuse(where, f"{key}: {json.dumps(raw[key])}", why)
    bias = raw.get("bias", "none")
    if bias != "none":
        raise _refuse(where, f"bias: {bias!r}", "trained biases of the base model")
    r = raw.get("r", 8)
    alpha = raw.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{where}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise CheckpointError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        raise CheckpointError(f"{where}: layers_to_transform must be an integer or a list of integers, got {layers!r}")
    pattern = _names(raw.get("layers_pattern"), where, "layers_pattern")
    ranks, alphas = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    for key, table in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        if not isinstance(table, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in table.values()
        ):
            raise CheckpointError(f"{where}: {key} must map module patterns to positive numbers, got {table!r}")
    return AdapterConfig(
        where=where,
        r=r,
        alpha=float(alpha),
        rslora=bool(raw.get("use_rslora", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        lora_bias=bool(raw.get("lora_bias", False)),
        target_modules=_names(raw.get("target_modules"), where, "target_modules"),
        exclude_modules=_names(raw.get("exclude_modules"), where, "exclude_modules"),
        modules_to_save=tuple(_names(raw.get("modules_to_save") or [], where, "modules_to_save") or ()),
        layers_to_transform=None if not layers else tuple(layers),
        layers_pattern=(pattern,) if isinstance(pattern, str) and pattern else tuple(pattern or ()),
        rank_pattern=ranks,
        alpha_pattern=alphas,
    )
