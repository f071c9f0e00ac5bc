"""``model+adapter``: the model's ``ModelSource`` with the adapter bound to it. Every tensor the adapter changes
becomes an ``AdaptedTensor``; every LoRA tensor is checked against the model (names, shapes, ranks) here, so
that a mismatch is a planning error that names the tensor, before anything is read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from mergekitlite.errors import CheckpointError
from mergekitlite.io.safetensors_header import FLOAT_CODES, TensorInfo
from mergekitlite.lora.adapter import Adapter, LoraModule, read_adapter
from mergekitlite.lora.reference import adapter_parts
from mergekitlite.lora.tensor import BIAS, LINEAR, TRANSPOSED, LoraFactor, adapted, replaced
from mergekitlite.roles import Role, find, role_of
from mergekitlite.sources import ModelSource, open_sources

# Model families whose linear layers are transformers' Conv1D (weight [in, out]): PEFT merges their LoRA
# transposed whatever fan_in_fan_out says. Elsewhere a square weight is an nn.Linear.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
MAX_LISTED = 10  # problems listed before "... and N more"


@dataclass
class AdaptedSource(ModelSource):
    """A model with an adapter: ``path``, ``config`` and side files are the model's; ``tensors`` as adapted."""

    adapter: Adapter | None = field(default=None, kw_only=True)

    def input_files(self) -> list[Path]:
        return [*self.weight_files, *(self.adapter.files if self.adapter is not None else [])]


def open_adapted(ref: str, base_dir: Path | None, aliases: Mapping[str, Path] | None = None) -> AdaptedSource:
    """Open ``model+adapter`` (raises ModelNotFoundError / CheckpointError like opening a model)."""
    parts = adapter_parts(ref, base_dir)
    assert parts is not None
    model_ref, adapter_ref = parts
    found, problems = open_sources([model_ref], base_dir, aliases)
    if problems:
        raise CheckpointError(problems[0])
    model = found[model_ref]
    adapter = read_adapter(adapter_ref, base_dir)
    tensors = bind(model, adapter)
    return AdaptedSource(
        ref=ref,
        path=model.path,
        config=model.config,
        tensors=tensors,
        weight_files=model.weight_files,
        from_hub=model.from_hub,
        layer_counts=model.layer_counts,
        adapter=adapter,
    )


def bind(model: ModelSource, adapter: Adapter) -> dict[str, TensorInfo]:
    """The model's tensors with the adapter's changes, in the model's order; CheckpointError lists every mismatch."""
    problems: list[str] = []
    factors: dict[str, list[LoraFactor]] = {}
    bases: dict[str, TensorInfo] = {}
    for _, lora in sorted(adapter.modules.items()):
        for name, factor, base in _factors(model, adapter, lora, problems):
            factors.setdefault(name, []).append(factor)
            if base is not None:
                bases[name] = base
    saved = _saved(model, adapter, problems)
    for name in sorted(set(saved) & set(factors)):
        problems.append(f"{name}: both a full copy (modules_to_save) and a LoRA of the same weight")
    if problems:
        more = len(problems) - MAX_LISTED
        shown = problems[:MAX_LISTED] + ([f"... and {more} more"] if more > 0 else [])
        where = f"adapter {adapter.ref!r} does not fit model {model.ref!r}"
        raise CheckpointError("\n".join(f"{where}: {p}" for p in shown))
    for name, found in factors.items():  # the weight's own module first (peft: the embedding before a tied head)
        found.sort(key=lambda f: f.module + ".weight" != name)
    out: dict[str, TensorInfo] = {}
    for name, info in model.tensors.items():
        if name in saved:
            out[name] = replaced(name, saved[name], info.dtype, adapter.ref)
        elif name in factors:
            base = bases.get(name, info)
            out[name] = adapted(replace(base, name=name), tuple(factors[name]), adapter.ref)
        else:
            out[name] = info
    return out


def _model_tensor(model: ModelSource, name: str) -> TensorInfo | None:
    """The stored tensor ``name`` of the model, following a tied output head to the embedding (PEFT merges a
    LoRA of a tied lm_head into the one shared weight)."""
    if name in model.tensors:
        return model.tensors[name]
    if role_of(name) is Role.HEAD and model.tied_embeddings:
        emb = find(model.tensors, Role.EMBEDDING, vocab_size=model.config_value("vocab_size"))
        return model.tensors[emb] if emb is not None else None
    return None


def _factors(
    model: ModelSource, adapter: Adapter, lora: LoraModule, problems: list[str]
) -> list[tuple[str, LoraFactor, TensorInfo | None]]:
    """(stored tensor name, factor, replaced base or None) for each LoRA of ``lora.module``."""
    cfg, m, parts = adapter.config, lora.module, lora.parts
    is_head = role_of(m + ".weight") is Role.HEAD
    if not cfg.targets(m, is_head=is_head):
        problems.append(
            f"{m}: the adapter has LoRA weights for it but its target_modules/exclude_modules/layers_to_transform "
            "do not select it (peft would not load them)"
        )
        return []
    out: list[tuple[str, LoraFactor, TensorInfo | None]] = []
    embedding = "embA" in parts or "embB" in parts
    a, b = (parts.get("embA"), parts.get("embB")) if embedding else (parts.get("A"), parts.get("B"))
    if (a is None) != (b is None) or (a is None and "bias" not in parts):
        have = ", ".join(sorted(parts))
        problems.append(f"{m}: incomplete LoRA (has {have}; needs both A and B)")
        return []
    weight = _model_tensor(model, m + ".weight")
    if weight is None:
        problems.append(f"{m}: the model has no tensor {m + '.weight'!r}")
        return []
    r, scale = cfg.rank(m), cfg.scale(m)
    base = adapter.base_layers.get(m)
    if base is not None and base.shape != weight.shape:
        problems.append(f"{m}.base_layer.weight is {list(base.shape)} but {weight.name} is {list(weight.shape)}")
        return []
    if a is not None and b is not None:
        kind = _orientation(model, weight, a, b, r, embedding, m, problems)
        if kind is None:
            return []
        if weight.dtype not in FLOAT_CODES:
            problems.append(f"{weight.name}: a LoRA of a {weight.dtype} tensor")
            return []
        out.append((weight.name, LoraFactor(m, kind, a, b, scale, r), base))
    if "bias" in parts:
        out += _bias(model, cfg.lora_bias, m, parts["bias"], scale, r, problems)
    return out


def _orientation(
    model: ModelSource,
    weight: TensorInfo,
    a: TensorInfo,
    b: TensorInfo,
    r: int,
    embedding: bool,
    m: str,
    problems: list[str],
) -> str | None:
    """LINEAR (W [out, in] = B·A) or TRANSPOSED ((B·A)ᵀ: embeddings, Conv1D) from the shapes; None + a problem."""
    shapes = f"W {list(weight.shape)}, A {list(a.shape)}, B {list(b.shape)}"
    if len(weight.shape) != 2 or len(a.shape) != 2 or len(b.shape) != 2:
        problems.append(f"{m}: only 2-D weights take a LoRA here ({shapes})")
        return None
    if a.shape[0] != r or b.shape[1] != r:
        problems.append(f"{m}: rank {r} (r / rank_pattern) but {shapes}")
        return None
    rows, cols = weight.shape
    linear = a.shape[1] == cols and b.shape[0] == rows
    transposed = a.shape[1] == rows and b.shape[0] == cols
    if embedding:
        linear = False
    elif linear and transposed:  # square: the module type decides, as in peft
        transposed = model.config_value("model_type") in CONV1D_MODEL_TYPES
        linear = not transposed
    if not (linear or transposed):
        problems.append(f"{m}: the LoRA does not fit the weight {weight.name} ({shapes})")
        return None
    return LINEAR if linear else TRANSPOSED


def _bias(
    model: ModelSource, enabled: bool, m: str, bias: TensorInfo, scale: float, r: int, problems: list[str]
) -> list[tuple[str, LoraFactor, TensorInfo | None]]:
    if not enabled:
        problems.append(
            f"{m}.lora_B.bias: adapter_config.json does not set lora_bias: true, so peft ignores this tensor; "
            "set it to apply the bias, or remove the tensor"
        )
        return []
    target = model.tensors.get(m + ".bias")
    if target is None or target.shape != bias.shape:
        have = list(target.shape) if target is not None else "none"
        problems.append(f"{m}.lora_B.bias is {list(bias.shape)} but the model's {m}.bias is {have}")
        return []
    return [(target.name, LoraFactor(m, BIAS, None, bias, scale, r), None)]


def _saved(model: ModelSource, adapter: Adapter, problems: list[str]) -> dict[str, TensorInfo]:
    """modules_to_save: model tensor name → the adapter's full copy."""
    out: dict[str, TensorInfo] = {}
    for name, info in sorted(adapter.saved.items()):
        module = name.rsplit(".", 1)[0]
        if not adapter.config.saves(module):
            problems.append(f"{name}: a full tensor for a module that modules_to_save does not name (peft ignores it)")
        elif name not in model.tensors:
            tied = role_of(name) is Role.HEAD and _model_tensor(model, name) is not None
            why = " (the model ties it to the embedding; a separate copy is not supported)" if tied else ""
            problems.append(f"{name}: the model has no such tensor{why}")
        elif model.tensors[name].shape != info.shape:
            have = list(model.tensors[name].shape)
            problems.append(f"{name} is {list(info.shape)} in the adapter but {have} in the model")
        else:
            out[name] = info
    return out


__all__ = ["BIAS", "LINEAR", "TRANSPOSED", "AdaptedSource", "bind", "open_adapted"]
