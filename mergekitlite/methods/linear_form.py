"""Linear merges written once, as data: a ``LinearForm`` says which inputs are combined with which
weights, and both the torch evaluator here and the fused native kernel (``methods/native.py``)
evaluate it with the same float32 operations in the same order.

A linear method's function builds the form from the input positions and the recipe parameters;
``linear_implementation`` makes the tensor function that evaluates it and keeps the builder
(``MethodSpec.linear_form``) so that the executor can hand the form to the native kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergekitlite.methods.registry import Implementation, input_positions

if TYPE_CHECKING:  # forms are built without torch (the native kernel evaluates them); only ``evaluate`` needs it
    from torch import Tensor


@dataclass(frozen=True)
class LinearForm:
    """``anchor·anchor_weight + scale · (Σⱼ wⱼ·(x[termⱼ] − x[subtract])) / divisor``, over the inputs ``x``.

    Evaluated left to right with one rounding per operation: for each term, subtract, then multiply
    by its weight (``None``: no multiplication, which is not always the same as × 1 for NaN payloads
    and costs a pass), accumulate; then divide, scale, add the anchor. ``None`` leaves a step out.
    """

    terms: tuple[int, ...]
    weights: tuple[float | None, ...]
    subtract: int | None = None
    divisor: float | None = None
    scale: float | None = None
    anchor: int | None = None
    anchor_weight: float | None = None  # the anchor's multiplier (model_stock's 1 − t); None: added as it is

    def __post_init__(self) -> None:
        if not self.terms or len(self.terms) != len(self.weights):
            raise ValueError(f"a linear form needs one weight per term, and at least one term: {self}")


def skip_ones(weights: Sequence[float]) -> tuple[float | None, ...]:
    """Weights with the ones left out: x·1 == x bit for bit for numbers, so the pass is saved."""
    return tuple(None if w == 1 else w for w in weights)


def evaluate(form: LinearForm, x: Sequence[Tensor]) -> Tensor:
    """The form on torch tensors (any float dtype and device); never modifies ``x``."""
    from mergekitlite.methods.primitives import divide_

    acc: Tensor | None = None
    for k, w in zip(form.terms, form.weights):
        v = x[k]
        if form.subtract is not None:
            v = v - x[form.subtract]
            if w is not None:
                v.mul_(w)
        elif w is not None:
            v = v * w
        if acc is None:
            acc = v.clone() if v is x[k] else v
        else:
            acc.add_(v)
    assert acc is not None  # LinearForm has at least one term
    if form.divisor is not None:
        divide_(acc, form.divisor)
    if form.scale is not None:
        acc.mul_(form.scale)
    if form.anchor is not None:
        acc.add_(x[form.anchor] if form.anchor_weight is None else x[form.anchor] * form.anchor_weight)
    return acc


FormBuilder = Callable[..., LinearForm]


def linear_implementation(build: FormBuilder) -> Implementation:
    """A linear method from its form builder ``build(base, models, **params)``, where ``base`` is the
    base's input position (``None`` without a base) and ``models`` the models'."""

    @functools.wraps(build)
    def tensor_fn(base: Tensor | None, models: Sequence[Tensor], **params: Any) -> Tensor:
        x = [base, *models] if base is not None else list(models)
        return evaluate(build(*input_positions(base is not None, len(models)), **params), x)  # type: ignore[arg-type]

    return Implementation(tensor_fn, linear_form=build)


def stats_linear_implementation(build: FormBuilder, statistic: Callable[[], Any]) -> Implementation:
    """A method whose result is a linear form of its inputs with coefficients computed from its whole-tensor
    statistic (slerp, multislerp, karcher): ``build(base, models, *, stats, **params)``. The tensor function
    evaluates the form on torch; the executor hands it to the native kernel once the statistic is known."""

    @functools.wraps(build)
    def tensor_fn(base: Tensor | None, models: Sequence[Tensor], **params: Any) -> Tensor:
        x = [base, *models] if base is not None else list(models)
        return evaluate(build(*input_positions(base is not None, len(models)), **params), x)  # type: ignore[arg-type]

    return Implementation(tensor_fn, statistic=statistic, stats_form=build)
