"""The exact result of a merge, tensor by tensor, from the recipe file both tools merged.

Each method's definition is computed here in float64 from the inputs (a few lines per method, written from
the papers/README, not from either tool's code), so the reference sees exactly the parameters the tools
saw. Ties at a top-k threshold go to the lowest flat index (our documented rule). The linear family uses
the recipe's weights as the fractions they mean (0.7 = 7/10) scaled to integers, so its sums and TIES sign
votes are exact; ``compare.round_bf16`` then rounds once (torch's float64 → bf16 rounds twice).
Used by bench/compare.py (``--recipe``), bench/run_bench.py and bench/parity_check.py.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import yaml
from compare import Reader

CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}

# mergekit's defaults (the same as ours) for the parameters the references read.
NORMALIZE_DEFAULT = {"linear": True, "ties": True, "della": True}
RESCALE_DEFAULT = {"dare_linear": True, "dare_ties": True, "della": True, "della_linear": True}
DEFAULTS: dict[str, Any] = {"lambda": 1.0, "density": 1.0, "gamma": 0.01, "epsilon": 0.15, "select_topk": 1.0}
LAYER = re.compile(r"\.layers\.(\d+)\.")


# ------------------------------------------------------------------ recipe → per-tensor parameters
def evaluate(setting: Any, name: str, t: float) -> Any:
    """A parameter setting for one tensor: scalar, gradient (linear over [0, 1]) or filtered rules."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(not isinstance(e, dict) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (scaled - i0)) * setting[i0] + (scaled - i0) * setting[i1]
    for rule in setting:
        if rule.get("filter") in (None, "*") or rule["filter"] in name:
            return evaluate(rule["value"], name, t)
    return None


@dataclass
class Case:
    method: str
    base: Path | None
    models: list[Path]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    layers: int
    slices: list[dict[str, Any]] = field(default_factory=list)
    unverified: int = 0  # elements where an "exact" float64 sum depended on the order of its terms

    @classmethod
    def load(cls, recipe: Path) -> Case:
        doc = yaml.safe_load(recipe.read_text())
        base = Path(doc["base_model"]) if doc.get("base_model") else None
        entries = doc.get("models") or []
        slices = doc.get("slices") or []
        if not entries and slices and doc["merge_method"] != "passthrough":
            entries = slices[0]["sources"]  # one slice over all layers (e.g. the classic SLERP recipe)
        models = [Path(e["model"]) for e in entries if base is None or Path(e["model"]) != base]
        params = [dict(e.get("parameters") or {}) for e in entries if base is None or Path(e["model"]) != base]
        first = base or (models[0] if models else Path(slices[0]["sources"][0]["model"]))
        config = json.loads((first / "config.json").read_text())
        return cls(
            doc["merge_method"],
            base,
            models,
            params,
            dict(doc.get("parameters") or {}),
            config["num_hidden_layers"],
            slices,
        )

    def t(self, name: str) -> float:
        m = LAYER.search(name)
        return int(m.group(1)) / (self.layers - 1) if m else 0.0  # tensors outside the layers: t = 0 (as both tools)

    def value(self, key: str, name: str, model: int | None = None) -> Any:
        for scope in ([self.model_params[model]] if model is not None else []) + [self.params]:
            if key in scope:
                return evaluate(scope[key], name, self.t(name))
        if key == "normalize":
            return NORMALIZE_DEFAULT.get(self.method, False)
        if key == "rescale":
            return RESCALE_DEFAULT.get(self.method, False)
        return DEFAULTS.get(key)

    def per_model(self, key: str, name: str) -> list[float]:
        return [float(self.value(key, name, i)) for i in range(len(self.models))]

    def exact_sum(self, terms: list[torch.Tensor]) -> torch.Tensor:
        """Σ terms in float64. With integer weights times bf16 differences every partial sum fits in 53 bits;
        as a check, elements whose sum in reverse order differs are counted in ``unverified``."""
        forward = sum(terms[1:], terms[0].clone())
        backward = sum(terms[-2::-1], terms[-1].clone())
        self.unverified += int((forward != backward).sum())
        return forward


# ------------------------------------------------------------------ the definitions
def f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def top_mask(values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Elements ranked in [lo, hi) by value, largest first, equal values: lower flat index first."""
    flat = values.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[lo:hi]] = True
    return mask.reshape(values.shape)


def rational(x: float) -> Fraction:
    """The short fraction a recipe number stands for (0.7 → 7/10; a gradient at layer 3 of 8 → k/70):
    the value the recipe means, where float64 ``0.7`` is off by 4e-17 — enough to flip a TIES sign vote
    whose exact sum is 0 (1.0·δ₁ + 0.7·δ₂ = 0 happens on bf16 grids)."""
    f = Fraction(x).limit_denominator(100_000)
    return f if abs(float(f) - x) <= 4e-16 * max(1.0, abs(x)) else Fraction(x)


@dataclass
class Scaled:
    """Weights as integers over a common denominator: wᵢ = W[i] / D, λ = a / b."""

    W: list[int]
    D: int
    a: int
    b: int

    @classmethod
    def of(cls, weights: list[float], lam: float = 1.0) -> Scaled:
        fr = [rational(w) for w in weights]
        d = math.lcm(*(f.denominator for f in fr))
        lf = rational(lam)
        return cls([int(f * d) for f in fr], d, lf.numerator, lf.denominator)


def ref_linear(case: Case, name: str, base: torch.Tensor | None, ms: list[torch.Tensor]) -> torch.Tensor:
    """Σ wᵢmᵢ (÷ Σ wᵢ with normalize) = Σ Wᵢmᵢ / (Σ Wᵢ or D): one rounding, the final division."""
    sc = Scaled.of(case.per_model("weight", name))
    num = case.exact_sum([wi * m for wi, m in zip(sc.W, ms, strict=True)])
    return num / (sum(sc.W) if case.value("normalize", name) else sc.D)


def ref_task_arithmetic(case: Case, name: str, base: torch.Tensor, ms: list[torch.Tensor]) -> torch.Tensor:
    """base + λ·Σ wᵢδᵢ (÷ Σ wᵢ) = base + a·Σ Wᵢδᵢ / (b·(Σ Wᵢ or D)); Σ Wᵢδᵢ is exact in float64."""
    sc = Scaled.of(case.per_model("weight", name), float(case.value("lambda", name)))
    num = case.exact_sum([wi * (m - base) for wi, m in zip(sc.W, ms, strict=True)])
    den = sum(sc.W) if case.value("normalize", name) and sum(sc.W) != 0 else sc.D
    return base + (sc.a * num) / (sc.b * den)


def ref_sparse(case: Case, name: str, base: torch.Tensor, ms: list[torch.Tensor]) -> torch.Tensor:
    """ties / breadcrumbs / breadcrumbs_ties: deterministic magnitude masks, then the sum or the TIES mix,
    with integer-scaled weights so that the sign vote Σ Wᵢδᵢ is exact (0 elects +)."""
    w, d = case.per_model("weight", name), case.per_model("density", name)
    sc = Scaled.of(w, float(case.value("lambda", name)))
    terms = []
    for i, m in enumerate(ms):
        delta = m - base
        n = delta.numel()
        if d[i] < 1:
            keep = int(d[i] * n)
            if case.method == "ties":
                lo, hi = 0, keep
            else:  # breadcrumbs: drop the ⌊γn⌋ largest, then the smallest, keeping ⌊dn⌋
                top = int(case.per_model("gamma", name)[i] * n)
                bottom = n - keep - top
                top += min(bottom, 0)
                lo, hi = top, top + keep
            delta = torch.where(top_mask(delta.abs(), lo, hi), delta, 0.0)
        terms.append(sc.W[i] * delta)
    normalize = bool(case.value("normalize", name))
    if case.method in CONSENSUS:
        vote = case.exact_sum(terms)
        positive = vote >= 0
        agree = [torch.where(positive, t > 0, t < 0) for t in terms]
        num = case.exact_sum([torch.where(a, t, 0.0) for a, t in zip(agree, terms, strict=True)])
        if normalize:
            den = sum(a.double() * wi for a, wi in zip(agree, sc.W, strict=True))
            den = den.masked_fill(den == 0, sc.D)  # nothing agrees: the sum is 0 anyway
        else:
            den = torch.full_like(num, float(sc.D))
    else:
        num = case.exact_sum(terms)
        den = torch.full_like(num, float(sum(sc.W) if normalize and sum(sc.W) != 0 else sc.D))
    return base + (sc.a * num) / (sc.b * den)


def ref_slerp(case: Case, name: str, base: torch.Tensor, ms: list[torch.Tensor]) -> torch.Tensor:
    t = float(case.value("t", name))
    v0, v1 = base, ms[0]
    n0, n1 = v0.norm().item(), v1.norm().item()
    dot = (v0 * v1).sum().item() / ((n0 if n0 > 1e-8 else 1.0) * (n1 if n1 > 1e-8 else 1.0))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(max(-1.0, min(1.0, dot)))
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def ref_nearswap(case: Case, name: str, base: torch.Tensor, ms: list[torch.Tensor]) -> torch.Tensor:
    t = float(case.value("t", name))
    w = (t / (base - ms[0]).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * ms[0] + (1 - w) * base


def _ram_terms(case: Case, name: str, base: torch.Tensor, ms: list[torch.Tensor]) -> tuple[list, torch.Tensor]:
    eps = float(case.value("epsilon", name))
    deltas = [m - base for m in ms]
    nonzero = [d.abs() > eps for d in deltas]
    count = sum(nz.to(torch.float64) for nz in nonzero)
    return [(d, nz) for d, nz in zip(deltas, nonzero, strict=True)], count


def ref_ram(case: Case, name: str, base: torch.Tensor, ms: list[torch.Tensor]) -> torch.Tensor:
    """base + Σ tᵢ, tᵢ = δᵢ where only model i has |δ| > ε, δᵢ/count where several do (float64; ε compared
    in float64, where the tool compares in float32: |δ| within float32 rounding of ε may count differently)."""
    terms, count = _ram_terms(case, name, base, ms)
    total = torch.zeros_like(base)
    for d, nz in terms:
        t = torch.where(nz, d / count.clamp(min=1), torch.zeros_like(d))
        if case.method == "ramplus_tl":
            unique = nz & (count == 1)
            shared = int((nz & (count > 1)).sum())
            own = int(unique.sum())
            eps, r, alpha = (float(case.value(k, name)) for k in ("epsilon", "r", "alpha"))
            lam = 1 + r * min(max(shared / max(own, eps), 0.0), alpha)
            t = torch.where(unique, d * lam, t)
        total = total + t
    return base + total


def ref_arcee_fusion(case: Case, name: str, base: torch.Tensor, ms: list[torch.Tensor]) -> torch.Tensor:
    """The definition in float64: importance |δ|·KL(softmax(m) + 1e-8 ‖ softmax(b) + 1e-8) per last-dim fiber,
    kept where ≥ median + 1.5·IQR of all importances, quantile q = sorted[⌊q·(N − 1)⌋] (exact: mergekit
    samples 1M elements at random above 1M)."""
    del case, name
    m = ms[0]
    p = torch.softmax(m, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = (m - base).abs() * (p * (p / q).log()).sum(dim=-1, keepdim=True)
    ordered = importance.reshape(-1).sort().values
    last = ordered.numel() - 1
    q1, med, q3 = (ordered[k].item() for k in (last // 4, last // 2, 3 * last // 4))
    return torch.where(importance >= med + 1.5 * (q3 - q1), m, base)


def ref_model_stock(case: Case, name: str, base: torch.Tensor, ms: list[torch.Tensor]) -> torch.Tensor:
    offsets = [(m - base).reshape(-1) for m in ms]
    cosines = [
        max(-1.0, min(1.0, (a @ b).item() / max(a.norm().item() * b.norm().item(), 1e-6)))
        for a, b in itertools.combinations(offsets, 2)
    ]
    cos, n = math.fsum(cosines) / len(cosines), len(ms)
    t = n * cos / (1 + (n - 1) * cos)
    return t * (sum(ms) / n) + (1 - t) * base


def ref_sce(case: Case, name: str, base: torch.Tensor, ms: list[torch.Tensor]) -> torch.Tensor:
    """Select the ⌊k·nnz⌋ highest variances across models, weight by mean δᵢ² (uniform when Σ < 1e-6, as
    mergekit), elect signs (unweighted Σ δ), weighted mean of the agreeing entries."""
    deltas = [m - base for m in ms]
    select = float(case.value("select_topk", name))
    if select < 1:
        var = torch.stack(deltas).var(0, unbiased=False)
        keep = top_mask(var, 0, int(int(torch.count_nonzero(var)) * select))
        deltas = [torch.where(keep, dl, 0.0) for dl in deltas]
    energy = [dl.square().mean().item() for dl in deltas]
    uniform = abs(math.fsum(energy)) < 1e-6  # typical fine-tune deltas (~1e-3) always land here
    omega = [1.0] * len(ms) if uniform else [e / math.fsum(energy) for e in energy]  # uniform: ωᵢ = 1/n, scaled by n
    positive = case.exact_sum(deltas) >= 0
    agree = [torch.where(positive, dl > 0, dl < 0).double() for dl in deltas]
    total = case.exact_sum([a * o * dl for a, o, dl in zip(agree, omega, deltas, strict=True)])
    divisor = sum(a * o for a, o in zip(agree, omega, strict=True))
    return base + total / divisor.clamp(min=1e-6 * (len(ms) if uniform else 1))


def ref_nuslerp(case: Case, name: str, base: torch.Tensor | None, ms: list[torch.Tensor]) -> torch.Tensor:
    """Flattened NuSLERP (the default): slerp of the two models (task vectors with a base), t = w₁/(w₀+w₁)."""
    w = case.per_model("weight", name)
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    v0, v1 = (ms[0], ms[1]) if base is None else (ms[0] - base, ms[1] - base)
    cos = (v0 * v1).sum().item() / (max(v0.norm().item(), 1e-7) * max(v1.norm().item(), 1e-7))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    res = (
        (1 - t) * v0 + t * v1
        if math.sin(theta) < 1e-8
        else (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)
    )
    return res if base is None else base + res


def ref_multislerp(case: Case, name: str, base: torch.Tensor | None, ms: list[torch.Tensor]) -> torch.Tensor:
    eps = 1e-8
    w = case.per_model("weight", name)
    if case.value("normalize_weights", name) is not False:
        w = [x / math.fsum(w) for x in w]
    vs = [m.reshape(-1) if base is None else (m - base).reshape(-1) for m in ms]
    norms = [v.norm().item() for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms, strict=True)]
    mean = sum(wi * u for wi, u in zip(w, units, strict=True))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units, strict=True))
    r = tangent.norm().item() + eps
    res = (math.cos(r) * mean + math.sin(r) / r * tangent) * math.fsum(n * wi for n, wi in zip(norms, w, strict=True))
    res = res.reshape(ms[0].shape)
    return res if base is None else base + res


def ref_karcher(case: Case, name: str, base: torch.Tensor | None, ms: list[torch.Tensor]) -> torch.Tensor:
    """Karcher mean on the unit sphere (equal weights, base included when set) × mean norm."""
    max_iter = int(case.value("max_iter", name) or 10)
    tol = float(case.value("tol", name) or 1e-5)
    points = [p.reshape(-1) for p in ([*ms, base] if base is not None else ms)]
    norms = [p.norm().item() for p in points]
    units = [p / n for p, n in zip(points, norms, strict=True) if n > tol]
    alpha = 1 / len(units)
    u = sum(alpha * x for x in units)
    u = units[0] if u.norm().item() < tol else u / u.norm()
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        for x in units:
            cos = max(-1.0, min(1.0, (u @ x).item()))
            theta = math.acos(cos)
            if theta >= tol:
                step += alpha * theta / math.sin(theta) * (x - cos * u)
        norm = step.norm().item()
        if norm < tol:
            break
        u = math.cos(norm) * u + math.sin(norm) * step / norm
        u = u / u.norm()
    return (math.fsum(norms) / len(points) * u).reshape(ms[0].shape)


REFERENCES = {
    "linear": ref_linear,
    "task_arithmetic": ref_task_arithmetic,
    "ties": ref_sparse,
    "breadcrumbs": ref_sparse,
    "breadcrumbs_ties": ref_sparse,
    "slerp": ref_slerp,
    "nearswap": ref_nearswap,
    "arcee_fusion": ref_arcee_fusion,
    "ram": ref_ram,
    "ramplus_tl": ref_ram,
    "model_stock": ref_model_stock,
    "sce": ref_sce,
    "nuslerp": ref_nuslerp,
    "multislerp": ref_multislerp,
    "karcher": ref_karcher,
}


def passthrough_source(case: Case, name: str) -> tuple[Path, str]:
    """Where a frankenmerge's output tensor comes from: layers slice by slice; embeddings from the first
    slice's model, final norm and lm_head from the last slice's (mergekit's convention)."""
    m = LAYER.search(name)
    if not m:
        first = "embed_tokens" in name
        src = case.slices[0 if first else -1]["sources"][0]
        return Path(src["model"]), name
    out = int(m.group(1))
    for sl in case.slices:
        src = sl["sources"][0]
        lo, hi = src["layer_range"]
        if out < hi - lo:
            return Path(src["model"]), LAYER.sub(f".layers.{lo + out}.", name, count=1)
        out -= hi - lo
    raise KeyError(name)


ELEMENTWISE = {"linear", "task_arithmetic", "nearswap", "ram", "passthrough"}  # a row block's value needs only its rows


class RecipeReference:
    """``compare.Reference`` for a recipe: the exact value of one output tensor (or row block) and, per
    element, the largest |input| it is computed from."""

    def __init__(self, recipe: Path, reader: Reader) -> None:
        self.case = Case.load(recipe)
        self.reader = reader
        self.elementwise = self.case.method in ELEMENTWISE

    @property
    def defined(self) -> bool:
        return self.case.method in REFERENCES or self.case.method == "passthrough"

    def __call__(self, name: str, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        case, get = self.case, self.reader.get
        if case.method == "passthrough":
            folder, src = passthrough_source(case, name)
            t = f64(get(folder, src, rows))
            return t, t.abs()
        base = f64(get(case.base, name, rows)) if case.base is not None else None
        ms = [f64(get(m, name, rows)) for m in case.models]
        scale = torch.stack([x.abs() for x in ([base] if base is not None else []) + ms]).amax(0)
        return REFERENCES[case.method](case, name, base, ms), scale
