"""Linear families: weighted sums of models or of their differences from a base.

Each method is a ``LinearForm`` builder (see ``linear_form``): given the input positions of the base
and the models and the recipe parameters, it says which inputs are combined, with which weights and
in which order. Operation order is part of the definition: it fixes the float32 rounding; the torch
evaluator and the native kernel follow it, and tests reproduce it.
"""

from __future__ import annotations

from collections.abc import Sequence

from mergekitlite.methods.linear_form import LinearForm, linear_method, skip_ones
from mergekitlite.methods.registry import REQUIRED


def _scale(lambda_: float) -> float | None:
    return None if lambda_ == 1 else lambda_


@linear_method(
    "task_arithmetic",
    base="required",
    per_model={"weight": REQUIRED},
    reference="https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(
    base: int,
    models: Sequence[int],
    *,
    weight: Sequence[float],
    normalize: bool = False,
    lambda_: float = 1.0,
) -> LinearForm:
    """base + λ·Σ wᵢ(mᵢ − base): add each model's task vector (its difference from the base), scaled.

    With ``normalize`` the weighted sum is divided by Σ wᵢ (skipped when |Σ wᵢ| < 1e-8, as mergekit does).
    This is the "chat vector" merge: base = pretrained model, models = continued-pretraining model and
    chat model, weights 1.
    """
    divisor = sum(weight) if normalize and abs(sum(weight)) >= 1e-8 else None
    return LinearForm(tuple(models), skip_ones(weight), base, divisor, _scale(lambda_), anchor=base)


@linear_method("add_difference", base="required", per_model={"weight": 1.0}, min_models=2)
def add_difference(
    base: int,
    models: Sequence[int],
    *,
    weight: Sequence[float],
    lambda_: float = 1.0,
) -> LinearForm:
    """models[0] + λ·Σᵢ≥₁ wᵢ(modelsᵢ − base): the seed's 差分マージ, written as the formula reads.

    The first model is the one the differences are added to (e.g. nekomata); every further model
    contributes its difference from ``base_model`` (e.g. qarasu − Qwen), scaled by its weight
    (default 1; the first model's weight is not used). Equal to task_arithmetic with weight 1 on the
    first model, up to float32 rounding.
    """
    return LinearForm(tuple(models[1:]), skip_ones(weight[1:]), base, scale=_scale(lambda_), anchor=models[0])


@linear_method("linear", base="unused", per_model={"weight": REQUIRED}, reference="https://arxiv.org/abs/2203.05482")
def linear(base: int | None, models: Sequence[int], *, weight: Sequence[float], normalize: bool = True) -> LinearForm:
    """Σ wᵢ·mᵢ, divided by Σ wᵢ when ``normalize`` (the default): a weighted mean of the models ("model soup")."""
    del base
    return LinearForm(tuple(models), tuple(weight), divisor=sum(weight) if normalize else None)


@linear_method("passthrough", base="unused", per_model={"scale": None}, max_models=1)
def passthrough(base: int | None, models: Sequence[int], *, scale: Sequence[float | None]) -> LinearForm:
    """The single input unchanged (optionally multiplied by ``scale``): tensors taken from one model, frankenmerges."""
    del base
    return LinearForm((models[0],), (scale[0],))


@linear_method("task_vector", base="required", per_model={"weight": 1.0}, aliases=("extract_delta",))
def task_vector(base: int, models: Sequence[int], *, weight: Sequence[float], lambda_: float = 1.0) -> LinearForm:
    """λ·Σ wᵢ(mᵢ − base): the task vector itself ("chat vector"), saved as a delta checkpoint.

    Use ``out_dtype: float32`` for the step that extracts it: the difference of two bf16 weights is
    then stored exactly, and applying it later with ``add_delta`` gives the one-step result bit for bit.
    """
    return LinearForm(tuple(models), skip_ones(weight), base, scale=_scale(lambda_))


@linear_method("add_delta", base="required", per_model={"weight": 1.0})
def add_delta(base: int, models: Sequence[int], *, weight: Sequence[float], lambda_: float = 1.0) -> LinearForm:
    """base + λ·Σ wᵢ·dᵢ, where the models are delta checkpoints made by ``task_vector``."""
    return LinearForm(tuple(models), tuple(weight), scale=_scale(lambda_), anchor=base)
