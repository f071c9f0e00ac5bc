"""Linear families: weighted sums of models or of their differences from a base.

All functions take and return float32 (or float64) tensors and never modify their inputs.
Operation order is part of the definition: it fixes the float32 rounding, and tests reproduce it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from mergekitlite.methods.primitives import divide_
from mergekitlite.methods.registry import REQUIRED, merge_method


def _scaled(x: Tensor, w: float) -> Tensor:
    # x·1 == x bit for bit (signed zeros and NaN included): skip a full pass over the data.
    return x if w == 1 else x.mul_(w)


def weighted_delta_sum(base: Tensor, models: Sequence[Tensor], weight: Sequence[float]) -> Tensor:
    """Σ wᵢ·(mᵢ − base), accumulated left to right."""
    total = _scaled(models[0] - base, weight[0])
    for m, w in zip(models[1:], weight[1:]):
        total.add_(_scaled(m - base, w))
    return total


@merge_method(
    "task_arithmetic",
    base="required",
    per_model={"weight": REQUIRED},
    reference="https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    weight: Sequence[float],
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """base + λ·Σ wᵢ(mᵢ − base): add each model's task vector (its difference from the base), scaled.

    With ``normalize`` the weighted sum is divided by Σ wᵢ (skipped when |Σ wᵢ| < 1e-8, as mergekit does).
    This is the "chat vector" merge: base = pretrained model, models = continued-pretraining model and
    chat model, weights 1.
    """
    delta = weighted_delta_sum(base, models, weight)
    if normalize:
        divisor = sum(weight)
        if abs(divisor) >= 1e-8:
            divide_(delta, divisor)
    if lambda_ != 1:
        delta.mul_(lambda_)
    return delta.add_(base)


@merge_method("add_difference", base="required", per_model={"weight": 1.0}, min_models=2)
def add_difference(
    base: Tensor,
    models: Sequence[Tensor],
    *,
    weight: Sequence[float],
    lambda_: float = 1.0,
) -> Tensor:
    """models[0] + λ·Σᵢ≥₁ wᵢ(modelsᵢ − base): the seed's 差分マージ, written as the formula reads.

    The first model is the one the differences are added to (e.g. nekomata); every further model
    contributes its difference from ``base_model`` (e.g. qarasu − Qwen), scaled by its weight
    (default 1; the first model's weight is not used). Equal to task_arithmetic with weight 1 on the
    first model, up to float32 rounding.
    """
    delta = weighted_delta_sum(base, models[1:], weight[1:])
    if lambda_ != 1:
        delta.mul_(lambda_)
    return delta.add_(models[0])


@merge_method("linear", base="unused", per_model={"weight": REQUIRED}, reference="https://arxiv.org/abs/2203.05482")
def linear(base: Tensor | None, models: Sequence[Tensor], *, weight: Sequence[float], normalize: bool = True) -> Tensor:
    """Σ wᵢ·mᵢ, divided by Σ wᵢ when ``normalize`` (the default): a weighted mean of the models ("model soup")."""
    del base
    total = models[0] * weight[0]
    for m, w in zip(models[1:], weight[1:]):
        total.add_(m * w)
    if normalize:
        divide_(total, sum(weight))
    return total


@merge_method("passthrough", base="unused", per_model={"scale": None}, max_models=1)
def passthrough(base: Tensor | None, models: Sequence[Tensor], *, scale: Sequence[float | None]) -> Tensor:
    """The single input unchanged (optionally multiplied by ``scale``): tensors taken from one model, frankenmerges."""
    del base
    s = scale[0]
    return models[0].clone() if s is None else models[0] * s


@merge_method("task_vector", base="required", per_model={"weight": 1.0}, aliases=("extract_delta",))
def task_vector(base: Tensor, models: Sequence[Tensor], *, weight: Sequence[float], lambda_: float = 1.0) -> Tensor:
    """λ·Σ wᵢ(mᵢ − base): the task vector itself ("chat vector"), saved as a delta checkpoint.

    Use ``out_dtype: float32`` for the step that extracts it: the difference of two bf16 weights is
    then stored exactly, and applying it later with ``add_delta`` gives the one-step result bit for bit.
    """
    delta = weighted_delta_sum(base, models, weight)
    return delta.mul_(lambda_) if lambda_ != 1 else delta


@merge_method("add_delta", base="required", per_model={"weight": 1.0})
def add_delta(base: Tensor, models: Sequence[Tensor], *, weight: Sequence[float], lambda_: float = 1.0) -> Tensor:
    """base + λ·Σ wᵢ·dᵢ, where the models are delta checkpoints made by ``task_vector``."""
    total = models[0] * weight[0]
    for d, w in zip(models[1:], weight[1:]):
        total.add_(d * w)
    if lambda_ != 1:
        total.mul_(lambda_)
    return total.add_(base)
