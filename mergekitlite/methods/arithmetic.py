"""Linear families: weighted sums of models or of their differences from a base.

Each method is a ``LinearForm`` builder (see ``linear_form``): given the input positions of the base
and the models and the recipe parameters, it says which inputs are combined, with which weights and
in which order. Operation order is part of the definition: it fixes the float32 rounding; the torch
evaluator and the native kernel follow it, and tests reproduce it. Parameters and their defaults are
declared in ``catalog``.
"""

from __future__ import annotations

from collections.abc import Sequence

from mergekitlite.methods.linear_form import LinearForm, linear_implementation, skip_ones


def _scale(lambda_: float) -> float | None:
    return None if lambda_ == 1 else lambda_


def task_arithmetic(
    base: int, models: Sequence[int], *, weight: Sequence[float], normalize: bool, lambda_: float
) -> LinearForm:
    """base + λ·Σ wᵢ(mᵢ − base).

    With ``normalize`` the weighted sum is divided by Σ wᵢ (skipped when |Σ wᵢ| < 1e-8, as mergekit does).
    This is the "chat vector" merge: base = pretrained model, models = continued-pretraining model and
    chat model, weights 1.
    """
    divisor = sum(weight) if normalize and abs(sum(weight)) >= 1e-8 else None
    return LinearForm(tuple(models), skip_ones(weight), base, divisor, _scale(lambda_), anchor=base)


def add_difference(base: int, models: Sequence[int], *, weight: Sequence[float], lambda_: float) -> LinearForm:
    """models[0] + λ·Σᵢ≥₁ wᵢ(modelsᵢ − base).

    The first model is the one the differences are added to (e.g. nekomata); every further model
    contributes its difference from ``base_model`` (e.g. qarasu − Qwen), scaled by its weight
    (default 1; the first model's weight is not used). Equal to task_arithmetic with weight 1 on the
    first model, up to float32 rounding.
    """
    return LinearForm(tuple(models[1:]), skip_ones(weight[1:]), base, scale=_scale(lambda_), anchor=models[0])


def linear(base: int | None, models: Sequence[int], *, weight: Sequence[float], normalize: bool) -> LinearForm:
    """Σ wᵢ·mᵢ, divided by Σ wᵢ when ``normalize``."""
    del base
    return LinearForm(tuple(models), tuple(weight), divisor=sum(weight) if normalize else None)


def passthrough(base: int | None, models: Sequence[int], *, scale: Sequence[float | None]) -> LinearForm:
    """The single input, multiplied by ``scale`` unless it is unset."""
    del base
    return LinearForm((models[0],), (scale[0],))


def task_vector(base: int, models: Sequence[int], *, weight: Sequence[float], lambda_: float) -> LinearForm:
    """λ·Σ wᵢ(mᵢ − base).

    Use ``out_dtype: float32`` for the step that extracts it: the difference of two bf16 weights is
    then stored exactly, and applying it later with ``add_delta`` gives the one-step result bit for bit.
    """
    return LinearForm(tuple(models), skip_ones(weight), base, scale=_scale(lambda_))


def add_delta(base: int, models: Sequence[int], *, weight: Sequence[float], lambda_: float) -> LinearForm:
    """base + λ·Σ wᵢ·dᵢ."""
    return LinearForm(tuple(models), tuple(weight), scale=_scale(lambda_), anchor=base)


IMPLEMENTATIONS = {
    build.__name__: linear_implementation(build)
    for build in (task_arithmetic, add_difference, linear, passthrough, task_vector, add_delta)
}
