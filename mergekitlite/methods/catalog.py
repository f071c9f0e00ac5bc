"""Every built-in merge method, declared: names, parameters (defaults, valid ranges), inputs, working
space. mergekit's names, parameters and defaults, so that published recipes run unchanged.

Nothing here imports torch: the recipe loader and the planner read these declarations, and each
method's tensor code (the module named by ``implementation``) is imported when first needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from mergekitlite.methods.registry import (
    REQUIRED,
    Constraint,
    MethodSpec,
    Param,
    Range,
    Registry,
    model_label,
)

_PKG = "mergekitlite.methods."

UNIT = Range(0.0, 1.0)
NON_NEGATIVE = Range(0.0)
POSITIVE = Range(0.0, low_open=True)

# ---------------------------------------------------------------------------------------------
# Parameters shared by several methods (``replace`` changes a default where a method's differs)

WEIGHT = Param("weight", REQUIRED, True, "the model's weight (any finite number; negative subtracts)")
LAMBDA = Param("lambda", 1.0, False, "scales the merged task vector before it is added to the base")
NORMALIZE = Param("normalize", False, False, "divide the weighted sum by the sum of the weights")
RESCALE = Param("rescale", False, False, "rescale each sparsified task vector to its original L1 norm")
INT8_MASK = Param("int8_mask", False, False, "accepted for mergekit compatibility (a memory saving there)")
DENSITY = Param("density", 1.0, True, "share of each task vector's entries kept (1: all)", UNIT)
GAMMA = Param("gamma", 0.01, True, "share of the largest |δ| dropped as outliers", UNIT)
# density ± epsilon must stay inside (0, 1) (see ``della_window_problem``), so epsilon < 0.5 whatever the density.
DELLA_EPSILON = Param(
    "epsilon", 0.15, True, "keep probabilities spread over density ± epsilon by rank", Range(0.0, 0.5, high_open=True)
)
T_FRACTION = Param("t", REQUIRED, False, "interpolation factor: 0 gives the base, 1 the other model", UNIT)
RAM_EPSILON = Param("epsilon", 1e-5, False, "|δ| above which an entry counts as changed", NON_NEGATIVE)


def _sum_problem(flag: str, total: Callable[[Iterable[float]], float]) -> Constraint:
    """With ``flag`` set, the method divides by the weights' sum (computed by ``total``, as the method does)."""

    def check(params: Mapping[str, Any], models: Sequence[str]) -> list[str]:
        weights = params.get("weight")
        if not params.get(flag) or not isinstance(weights, (tuple, list)) or total(weights) != 0:
            return []
        return [f"weight: the weights sum to 0 and {flag} divides by their sum; change them or set {flag}: false"]

    return check


def della_window_problem(density: float, epsilon: float) -> str | None:
    """DELLA keeps entries with probabilities from density − epsilon to density + epsilon, which must lie
    inside (0, 1) whenever the density sparsifies (0 < density < 1; mergekit's condition)."""
    if not 0 < density < 1 or (density - epsilon > 0 and density + epsilon < 1):
        return None
    return (
        f"density ± epsilon must lie inside (0, 1), got density {density:g} and epsilon {epsilon:g}; "
        f"use an epsilon below {min(density, 1 - density):g}"
    )


def _della_windows(params: Mapping[str, Any], models: Sequence[str]) -> list[str]:
    pairs = zip(params.get("density", ()), params.get("epsilon", ()))
    return [
        f"epsilon of {model_label(models, i)}: {problem}"
        for i, (d, e) in enumerate(pairs)
        if (problem := della_window_problem(float(d), float(e))) is not None
    ]


# ---------------------------------------------------------------------------------------------
# Generalized task arithmetic: one implementation, one row per method (as mergekit's registry)

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della"]
_RANDOM_SPARSIFIERS = ("random", "della")
_SPARSIFIER_PARAMS: dict[str, tuple[Param, ...]] = {"magnitude_outliers": (GAMMA,), "della": (DELLA_EPSILON,)}


@dataclass(frozen=True)
class GtaMethod:
    """base + λ·mix(wᵢ·sparsifyᵢ(δᵢ)): how one member of the family sparsifies and mixes.

    ``sparsifier``: ``magnitude`` keeps the ⌊d·n⌋ largest |δ| (TIES), ``random`` each entry with
    probability d (DARE), ``magnitude_outliers`` drops the ⌊γ·n⌋ largest and the smallest (Breadcrumbs),
    ``della`` keeps with probability d ± ε by magnitude rank (DELLA). ``consensus``: TIES sign election."""

    name: str
    sparsifier: Sparsifier
    consensus: bool
    normalize: bool  # defaults
    rescale: bool
    reference: str
    summary: str
    temporaries: tuple[int, int]  # measured: tests/test_working_set.py

    def spec(self) -> MethodSpec:
        params = (
            WEIGHT,
            DENSITY,
            *_SPARSIFIER_PARAMS.get(self.sparsifier, ()),
            replace(NORMALIZE, default=self.normalize),
            replace(RESCALE, default=self.rescale),
            LAMBDA,
            INT8_MASK,
        )
        return MethodSpec(
            self.name,
            params,
            base="required",
            implementation=_PKG + "sparsify",
            summary=self.summary,
            elementwise=False,
            reference=self.reference,
            has_statistic=True,
            random=self.sparsifier in _RANDOM_SPARSIFIERS,
            temporaries_base=self.temporaries[0],
            temporaries_per_model=self.temporaries[1],
            constraints=(_della_windows,) if self.sparsifier == "della" else (),
        )


_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"

GTA_FAMILY: tuple[GtaMethod, ...] = (
    GtaMethod(
        "ties", "magnitude", True, True, False, _TIES,
        "TIES: keep each task vector's ⌊dᵢ·n⌋ largest |δ|, elect signs by mass, mean of the agreeing entries.",
        (4, 2),
    ),
    GtaMethod(
        "dare_ties", "random", True, False, True, _DARE,
        "DARE + TIES: drop each element of δᵢ with probability 1 − dᵢ, rescale to the same L1 norm, TIES mix.",
        (4, 2),
    ),
    GtaMethod(
        "dare_linear", "random", False, False, True, _DARE,
        "DARE: drop each element of δᵢ with probability 1 − dᵢ, rescale to the same L1 norm, then task arithmetic.",
        (4, 1),
    ),
    GtaMethod(
        "breadcrumbs", "magnitude_outliers", False, False, False, _BREADCRUMBS,
        "Model Breadcrumbs: drop the ⌊γᵢ·n⌋ largest |δ| (outliers) and the smallest, keeping ⌊dᵢ·n⌋; "
        "task arithmetic.",
        (4, 1),
    ),
    GtaMethod(
        "breadcrumbs_ties", "magnitude_outliers", True, False, False, _BREADCRUMBS,
        "Model Breadcrumbs masks (drop the ⌊γᵢ·n⌋ largest and the smallest |δ|, keep ⌊dᵢ·n⌋) with TIES sign "
        "election.",
        (4, 2),
    ),
    GtaMethod(
        "della", "della", True, True, True, _DELLA,
        "DELLA: keep δ entries with probability dᵢ − εᵢ … dᵢ + εᵢ rising with their magnitude rank, rescale, "
        "TIES mix.",
        (6, 2),
    ),
    GtaMethod(
        "della_linear", "della", False, False, True, _DELLA,
        "DELLA's magnitude-ranked random drop (probability dᵢ ± εᵢ), L1 rescale, then task arithmetic.",
        (6, 2),
    ),
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Linear methods (``arithmetic``): a LinearForm each, evaluated by torch or the native kernel


def _linear(name: str, params: tuple[Param, ...], summary: str, **kw: Any) -> MethodSpec:
    return MethodSpec(name, params, implementation=_PKG + "arithmetic", summary=summary, linear=True, **kw)


LINEAR_METHODS = (
    _linear(
        "task_arithmetic",
        (WEIGHT, NORMALIZE, LAMBDA),
        "base + λ·Σ wᵢ(mᵢ − base): add each model's task vector (its difference from the base), scaled.",
        base="required",
        reference="https://arxiv.org/abs/2212.04089",
    ),
    _linear(
        "add_difference",
        (replace(WEIGHT, default=1.0), LAMBDA),
        "models[0] + λ·Σᵢ≥₁ wᵢ(modelsᵢ − base): the seed's 差分マージ, written as the formula reads.",
        base="required",
        min_models=2,
    ),
    _linear(
        "linear",
        (WEIGHT, replace(NORMALIZE, default=True)),
        'Σ wᵢ·mᵢ, divided by Σ wᵢ when ``normalize`` (the default): a weighted mean of the models ("model soup").',
        base="unused",
        reference="https://arxiv.org/abs/2203.05482",
        constraints=(_sum_problem("normalize", sum),),
    ),
    _linear(
        "passthrough",
        (Param("scale", None, True, "multiplies the tensor (unset: copied unchanged)"),),
        "The single input unchanged (optionally multiplied by ``scale``): tensors taken from one model, frankenmerges.",
        base="unused",
        max_models=1,
    ),
    _linear(
        "task_vector",
        (replace(WEIGHT, default=1.0), LAMBDA),
        'λ·Σ wᵢ(mᵢ − base): the task vector itself ("chat vector"), saved as a delta checkpoint.',
        base="required",
        aliases=("extract_delta",),
    ),
    _linear(
        "add_delta",
        (replace(WEIGHT, default=1.0), LAMBDA),
        "base + λ·Σ wᵢ·dᵢ, where the models are delta checkpoints made by ``task_vector``.",
        base="required",
    ),
)


# ---------------------------------------------------------------------------------------------
# The other methods


def _stat(
    name: str, params: tuple[Param, ...], module: str, summary: str, temporaries: tuple[int, int], **kw: Any
) -> MethodSpec:
    """A method with a whole-tensor statistic (not elementwise); ``temporaries``: (base, per model), measured
    by tests/test_working_set.py."""
    return MethodSpec(
        name,
        params,
        implementation=_PKG + module,
        summary=summary,
        elementwise=False,
        has_statistic=True,
        temporaries_base=temporaries[0],
        temporaries_per_model=temporaries[1],
        **kw,
    )


OTHER_METHODS = (
    _stat(
        "sce",
        (Param("select_topk", 1.0, False, "share of the elements (by variance across models) kept", UNIT), INT8_MASK),
        "sparsify",
        "SCE: keep the ⌊select_topk·nnz⌋ elements whose task vectors vary most across models, weight each model "
        "by its share of Σ mean(δᵢ²), and average the entries agreeing with the elected sign.",
        base="required",
        reference="https://arxiv.org/abs/2408.07990",
        temporaries=(6, 4),
    ),
    _stat(
        "slerp",
        (T_FRACTION,),
        "spherical",
        "Spherical interpolation from the base (t = 0) to the other model (t = 1), over the whole tensor.",
        base="required",
        max_models=1,
        reference="https://en.wikipedia.org/wiki/Slerp",
        temporaries=(6, 2),
    ),
    _stat(
        "nuslerp",
        (
            WEIGHT,
            Param("nuslerp_row_wise", False, False, "with nuslerp_flatten false: one angle per column, not per row"),
            Param("nuslerp_flatten", True, False, "one angle for the whole tensor"),
        ),
        "spherical",
        "SLERP of two models with t = w₁/(w₀ + w₁), of their task vectors when a base is given (base + slerp(δ₀, δ₁)).",
        base="optional",
        min_models=2,
        max_models=2,
        temporaries=(6, 2),
    ),
    _stat(
        "multislerp",
        (
            WEIGHT,
            Param("normalize_weights", True, False, "divide the weights by their sum"),
            Param("eps", 1e-8, False, "added to the norms before dividing by them", POSITIVE),
        ),
        "spherical",
        "Barycentric SLERP of any number of models (of their task vectors when a base is given).",
        base="optional",
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        temporaries=(6, 2),
        constraints=(_sum_problem("normalize_weights", math.fsum),),
    ),
    _stat(
        "karcher",
        (
            Param("max_iter", 10, False, "most iterations of the mean", Range(0.0, whole=True)),
            Param("tol", 1e-5, False, "step length at which the iteration stops; smaller norms are ignored", POSITIVE),
        ),
        "spherical",
        "Karcher (Riemannian) mean of the inputs' directions on the unit sphere, times their mean norm.",
        base="optional",
        reference="https://en.wikipedia.org/wiki/Karcher_mean",
        temporaries=(6, 2),
    ),
    _stat(
        "model_stock",
        (Param("filter_wise", False, False, "one angle per row (fibers along the last dim), not per tensor"),),
        "stock",
        "Model Stock: t·mean(models) + (1 − t)·base, with t = N·cos θ/(1 + (N − 1)·cos θ).",
        base="required",
        min_models=2,
        reference="https://arxiv.org/abs/2403.19522",
        temporaries=(6, 2),
    ),
    _stat(
        "ramplus_tl",
        (
            Param("r", 0.1, False, "reinforcement strength", NON_NEGATIVE),
            Param("alpha", 0.2, False, "cap on the shared/unique ratio", NON_NEGATIVE),
            RAM_EPSILON,
        ),
        "ram",
        "RAM whose unique entries of model i are scaled by λᵢ = 1 + r·clamp(shared_i / max(unique_i, ε), 0, alpha).",
        base="required",
        reference="https://arxiv.org/abs/2601.13572",
        # Measured 4 for the statistic pass and 5 for the merge when some λ ≠ 1 (tests/test_working_set.py's
        # ε = 0.1 leaves every λ at 1, measuring 4: the unique-entry factor is then never made).
        temporaries=(6, 0),
    ),
    _stat(
        "arcee_fusion",
        (),
        "fusion",
        "Arcee Fusion: the base, plus the model's difference where its importance |δ|·KL(softmax rows) is an outlier.",
        base="required",
        max_models=1,
        reference="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/arcee_fusion.py",
        # Measured 3 (statistic passes) and 2 (merge) on the CPU (tests/test_working_set.py); on a GPU the
        # histograms also widen the keys to int64 (bincount): at (4, 0) an H200 peaked 3% over --max-vram.
        temporaries=(6, 0),
    ),
    MethodSpec(
        "ram",
        (RAM_EPSILON,),
        base="required",
        implementation=_PKG + "ram",
        summary="base + Σᵢ δᵢ where only model i changes the element (|δ| > ε), δᵢ / count where `count` models do.",
        reference="https://arxiv.org/abs/2601.13572",
        temporaries_base=5,  # measured 4 (tests/test_working_set.py)
    ),
    MethodSpec(
        "nearswap",
        (Param("t", REQUIRED, False, "distance below which the model's value is taken", NON_NEGATIVE),),
        base="required",
        implementation=_PKG + "nearswap",
        summary="Per element, w·model + (1 − w)·base with w = clamp(t / max(|base − model|, 1e-6), 0, 1).",
        max_models=1,
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        temporaries_base=6,  # measured: tests/test_working_set.py
    ),
)

REGISTRY = Registry.of([*LINEAR_METHODS, *(row.spec() for row in GTA_FAMILY), *OTHER_METHODS])
