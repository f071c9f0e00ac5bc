"""Check one parity case: our merged checkpoint vs mergekit's, and both vs an exact float64 reference.

Run by bench/parity.py as a child process, untimed (the harness itself must not import torch: Linux
passes its RSS high-water mark on to every later child's ``ru_maxrss``). Everything is read from the
recipe file both tools merged, so the reference sees exactly the parameters they saw:

* **agreement**, every tensor: bitwise equal, within one bf16 ulp, max |ours − mergekit| (bench/compare.py);
* **exact**, a few tensors, deterministic methods: each output against the method's definition computed
  here in float64 from the inputs (a few lines per method, written from the papers/README, not from
  either tool's code). Ties at a top-k threshold go to the lowest flat index (our documented rule). The
  linear family uses the recipe's weights as the fractions they mean (0.7 = 7/10) scaled to integers,
  so its sums and TIES sign votes are exact; the result is rounded to bf16 here (torch's float64 → bf16
  rounds twice). Misses are split into exact ties, 1 ulp, cancellation and the rest;
* **random** (DARE/DELLA): the draws differ by construction, so per 2-D tensor we *decode* which task
  vectors each output element kept (the subset S whose candidate value λ·Σ_S sᵢwᵢδᵢ(/Σ_S wᵢ) reproduces
  the bf16 output, else the nearest; ambiguous elements are left out; sᵢ, the L1 rescale factor, is
  estimated from the data), and compare keep rates, keep rates by magnitude quartile (DELLA's ranked
  probabilities), rescale factors and output mean/std.

    python bench/parity_check.py RECIPE --ours OUT_A --mergekit OUT_B --json report.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import yaml
from compare import Agreement, ordered_key, tensor_files
from safetensors import safe_open

DEFAULT_EXACT = (  # for the 8-layer preset "medium"; parity.py passes its own list
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.4.mlp.down_proj.weight",
    "model.layers.6.self_attn.k_proj.weight",
    "model.layers.3.post_attention_layernorm.weight",
    "lm_head.weight",
)
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
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


# ------------------------------------------------------------------ tensors
class Reader:
    """Whole tensors by (model folder, name); handles stay open."""

    def __init__(self) -> None:
        self.files: dict[Path, dict[str, Path]] = {}
        self.handles: dict[Path, Any] = {}

    def get(self, folder: Path, name: str) -> torch.Tensor:
        if folder not in self.files:
            self.files[folder] = tensor_files(folder)
        path = self.files[folder][name]
        if path not in self.handles:
            self.handles[path] = safe_open(path, "pt")
        return self.handles[path].get_tensor(name)

    def names(self, folder: Path) -> dict[str, Path]:
        if folder not in self.files:
            self.files[folder] = tensor_files(folder)
        return self.files[folder]


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


UNVERIFIED = [0]  # elements where an "exact" float64 sum depended on the order of its terms


def exact_sum(terms: list[torch.Tensor]) -> torch.Tensor:
    """Σ terms in float64. With integer weights times bf16 differences every partial sum fits in 53 bits;
    as a check, elements whose sum in reverse order differs are counted in UNVERIFIED."""
    forward = sum(terms[1:], terms[0].clone())
    backward = sum(terms[-2::-1], terms[-1].clone())
    UNVERIFIED[0] += int((forward != backward).sum())
    return forward


def ref_linear(case: Case, name: str, base: torch.Tensor | None, ms: list[torch.Tensor]) -> torch.Tensor:
    """Σ wᵢmᵢ (÷ Σ wᵢ with normalize) = Σ Wᵢmᵢ / (Σ Wᵢ or D): one rounding, the final division."""
    sc = Scaled.of(case.per_model("weight", name))
    num = exact_sum([wi * m for wi, m in zip(sc.W, ms, strict=True)])
    return num / (sum(sc.W) if case.value("normalize", name) else sc.D)


def ref_task_arithmetic(case: Case, name: str, base: torch.Tensor, ms: list[torch.Tensor]) -> torch.Tensor:
    """base + λ·Σ wᵢδᵢ (÷ Σ wᵢ) = base + a·Σ Wᵢδᵢ / (b·(Σ Wᵢ or D)); Σ Wᵢδᵢ is exact in float64."""
    sc = Scaled.of(case.per_model("weight", name), float(case.value("lambda", name)))
    num = exact_sum([wi * (m - base) for wi, m in zip(sc.W, ms, strict=True)])
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
        vote = exact_sum(terms)
        positive = vote >= 0
        agree = [torch.where(positive, t > 0, t < 0) for t in terms]
        num = exact_sum([torch.where(a, t, 0.0) for a, t in zip(agree, terms, strict=True)])
        if normalize:
            den = sum(a.double() * wi for a, wi in zip(agree, sc.W, strict=True))
            den = den.masked_fill(den == 0, sc.D)  # nothing agrees: the sum is 0 anyway
        else:
            den = torch.full_like(num, float(sc.D))
    else:
        num = exact_sum(terms)
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
    positive = exact_sum(deltas) >= 0
    agree = [torch.where(positive, dl > 0, dl < 0).double() for dl in deltas]
    total = exact_sum([a * o * dl for a, o, dl in zip(agree, omega, deltas, strict=True)])
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


def reference(case: Case, reader: Reader, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact result for one tensor, and per element the largest |input| it is computed from."""
    if case.method == "passthrough":
        folder, src = passthrough_source(case, name)
        t = f64(reader.get(folder, src))
        return t, t.abs()
    base = f64(reader.get(case.base, name)) if case.base is not None else None
    ms = [f64(reader.get(m, name)) for m in case.models]
    scale = torch.stack([x.abs() for x in ([base] if base is not None else []) + ms]).amax(0)
    return REFERENCES[case.method](case, name, base, ms), scale


# ------------------------------------------------------------------ distance from the exact result
def from_key(key: torch.Tensor) -> torch.Tensor:
    """Inverse of compare.ordered_key: ordered integers → bf16 values."""
    bits = torch.where(key < 0, (-key) | 0x8000, key)
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.bfloat16)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """float64 → bf16, correctly rounded (nearest, ties to even). torch's ``.to(bfloat16)`` goes through
    float32, and that double rounding is wrong for ~1 in 65,000 values that need more than 24 bits
    (e.g. (7δ₂ + 5δ₃)/12) — the very level of the differences measured here. Normal range only."""
    drop = 52 - 7  # float64 mantissa bits below bf16's 7
    bits = x.contiguous().view(torch.int64)
    bits = bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)  # carries into the exponent as needed
    bits = bits & ~((1 << drop) - 1)
    return bits.view(torch.float64).to(torch.float32).to(torch.bfloat16)  # both conversions now exact


@dataclass
class Exactness:
    """A bf16 result against the exact value (float64): correctly rounded, or how far from it. An exact
    tie (the exact value halfway between two bf16 values) rounds to even; a result on the other side
    of a tie is counted apart, since any float32 rounding of the operands decides such a tie."""

    elements: int = 0
    correct: int = 0
    ties: int = 0  # exact value is a bf16 midpoint
    wrong_at_tie: int = 0
    wrong_1ulp: int = 0  # one bf16 value off, not at a tie
    cancellation: int = 0  # ≥ 2 off, but by less than 4 float32 ulps of the largest operand (a result ≪ its inputs)
    wrong_more: int = 0  # ≥ 2 off beyond that
    max_vs_rounded: float = 0.0
    sum_abs: float = 0.0

    def add(self, got: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor) -> None:
        """``scale``: per element, the largest |input| the result was computed from."""
        rounded = round_bf16(exact)
        below = exact - rounded.double()
        neighbour = from_key(ordered_key(rounded) + below.sign().to(torch.int32))
        tie = (below != 0) & ((rounded.double() + neighbour.double()) / 2 == exact)
        off = (ordered_key(got) - ordered_key(rounded)).abs()
        self.elements += got.numel()
        self.correct += int((off == 0).sum())
        self.ties += int(tie.sum())
        self.wrong_at_tie += int((tie & (off == 1)).sum())
        self.wrong_1ulp += int((~tie & (off == 1)).sum())
        small = (got.double() - exact).abs() <= scale * 2.0**-21
        self.cancellation += int(((off > 1) & small).sum())
        self.wrong_more += int(((off > 1) & ~small).sum())
        if got.numel():
            self.max_vs_rounded = max(self.max_vs_rounded, float((got.double() - rounded.double()).abs().max()))
        self.sum_abs += float((got.double() - exact).abs().sum())

    def summary(self) -> dict[str, float]:
        n = max(1, self.elements)
        return {
            "elements": self.elements,
            "correctly_rounded_frac": self.correct / n,
            "ties": self.ties,
            "wrong_at_tie": self.wrong_at_tie,
            "wrong_1ulp": self.wrong_1ulp,
            "cancellation": self.cancellation,
            "wrong_more": self.wrong_more,
            "max_vs_rounded": self.max_vs_rounded,
            "mean_abs": self.sum_abs / n,
        }


# ------------------------------------------------------------------ random methods: decode the masks
@dataclass
class Decoded:
    """Per tool, summed over the 2-D tensors. An element is *resolved* when exactly one subset S of the
    models reproduces its bf16 output (bf16(base + candidate_S) == out), or none does and the nearest
    candidate is taken; it is *ambiguous* when several do (tiny δ, or δ₁ ≈ δ₂), and left out of the keep
    rates, which are therefore rates among resolved elements, for both tools alike."""

    elements: int = 0
    changed: int = 0  # out ≠ base: needs no decoding
    resolved: int = 0
    fit_exact: int = 0  # resolved by an exact reproduction
    kept: list[int] = field(default_factory=list)  # per model
    quartile_resolved: list[list[int]] = field(default_factory=list)  # per model, per |δᵢ| row-rank quartile
    quartile_kept: list[list[int]] = field(default_factory=list)
    scales: list[list[float]] = field(default_factory=list)  # per model, per tensor: estimated rescale factor
    per_tensor_keep: dict[str, list[float]] = field(default_factory=dict)
    sum_y: float = 0.0
    sum_y2: float = 0.0

    def summary(self) -> dict[str, Any]:
        n, r = max(1, self.elements), max(1, self.resolved)
        mean = self.sum_y / n
        return {
            "elements": self.elements,
            "changed_frac": self.changed / n,
            "resolved_frac": self.resolved / n,
            "fit_exact_frac": self.fit_exact / n,
            "keep": [k / r for k in self.kept],
            "keep_by_quartile": [
                [k / max(1, m) for k, m in zip(ks, ms, strict=True)]
                for ks, ms in zip(self.quartile_kept, self.quartile_resolved, strict=True)
            ],
            "scale_median": [sorted(s)[len(s) // 2] if s else None for s in self.scales],
            "scale_min": [min(s) if s else None for s in self.scales],
            "scale_max": [max(s) if s else None for s in self.scales],
            "delta_mean": mean,
            "delta_std": math.sqrt(max(0.0, self.sum_y2 / n - mean * mean)),
            "per_tensor_keep": self.per_tensor_keep,
        }


def row_quartiles(magnitudes: torch.Tensor) -> torch.Tensor:
    """0..3: quartile of each element's rank by magnitude within its row (dim 1, as DELLA ranks; equal
    magnitudes rank by index)."""
    ranks = magnitudes.argsort(dim=1, stable=True).argsort(dim=1)
    return (ranks * 4 // magnitudes.shape[1]).clamp(max=3)


def nearest(cands: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Index of the candidate nearest to y, per element (a loop: argmin over dim 0 is slow on CPU)."""
    best, choice = (cands[0] - y).abs(), torch.zeros_like(y, dtype=torch.int64)
    for k in range(1, cands.shape[0]):
        dist = (cands[k] - y).abs()
        closer = dist < best
        best = torch.where(closer, dist, best)
        choice.masked_fill_(closer, k)
    return choice


def candidates(
    deltas: list[torch.Tensor], w: list[float], scales: list[float], lam: float, normalize: bool, consensus: bool
) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """Every subset S of the models and its output delta λ·Σ_S sᵢwᵢδᵢ (÷ Σ_S wᵢ for TIES, ÷ Σ w for linear)."""
    subsets = [s for r in range(len(deltas) + 1) for s in itertools.combinations(range(len(deltas)), r)]
    values = []
    for s in subsets:
        v = sum((scales[i] * w[i] * deltas[i] for i in s), torch.zeros_like(deltas[0]))
        if normalize:
            divisor = math.fsum(w[i] for i in s) if consensus else math.fsum(w)
            v = v / (divisor if divisor != 0 else 1.0)
        values.append(lam * v)
    return subsets, torch.stack(values)


def decode(cands: torch.Tensor, y: torch.Tensor, base: torch.Tensor, got: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(choice, resolved, exact): the subset index per element, where it is unambiguous, where it
    reproduces the output bit for bit."""
    bits = got.view(torch.int16)
    match = torch.stack([round_bf16(base + c).view(torch.int16) == bits for c in cands])
    count = match.sum(0)
    choice = torch.where(count == 1, match.to(torch.int8).argmax(0), nearest(cands, y))
    return choice, count <= 1, count == 1


def decode_tensor(case: Case, reader: Reader, out: Path, name: str, acc: Decoded) -> None:
    base = f64(reader.get(case.base, name))
    got = reader.get(out, name)
    y = f64(got) - base
    deltas = [f64(reader.get(m, name)) - base for m in case.models]
    w, d = case.per_model("weight", name), case.per_model("density", name)
    lam, normalize = float(case.value("lambda", name)), bool(case.value("normalize", name))
    consensus = case.method in CONSENSUS
    scales = [1 / di if case.value("rescale", name) and 0 < di < 1 else 1.0 for di in d]
    # Nearest candidates with sᵢ = 1/dᵢ; re-estimate each sᵢ from the large |δᵢ| that model i alone explains;
    # then the full decode with those.
    subsets, cands = candidates(deltas, w, scales, lam, normalize, consensus)
    choice = nearest(cands, y)
    for i in range(len(deltas)):
        alone = (choice == subsets.index((i,))) & (deltas[i].abs() > deltas[i].abs().median())
        _, unit = candidates([deltas[i]], [w[i]], [1.0], lam, normalize, consensus)
        scales[i] = (y[alone] / unit[1][alone]).median().item() if int(alone.sum()) > 100 else scales[i]
    subsets, cands = candidates(deltas, w, scales, lam, normalize, consensus)
    choice, resolved, exact = decode(cands, y, base, got)
    if not acc.kept:
        acc.kept = [0] * len(deltas)
        acc.quartile_kept = [[0] * 4 for _ in deltas]
        acc.quartile_resolved = [[0] * 4 for _ in deltas]
        acc.scales = [[] for _ in deltas]
    acc.elements += y.numel()
    acc.changed += int((got.view(torch.int16) != base.to(torch.bfloat16).view(torch.int16)).sum())
    acc.resolved += int(resolved.sum())
    acc.fit_exact += int(exact.sum())
    acc.sum_y += y.sum().item()
    acc.sum_y2 += y.square().sum().item()
    keeps = []
    for i in range(len(deltas)):
        kept = torch.zeros_like(resolved)
        for k, sub in enumerate(subsets):
            if i in sub:
                kept |= choice == k
        kept &= resolved
        acc.kept[i] += int(kept.sum())
        quart = row_quartiles(deltas[i].abs())
        for q in range(4):
            acc.quartile_kept[i][q] += int((kept & (quart == q)).sum())
            acc.quartile_resolved[i][q] += int((resolved & (quart == q)).sum())
        acc.scales[i].append(scales[i])
        keeps.append(int(kept.sum()) / max(1, int(resolved.sum())))
    acc.per_tensor_keep[name] = keeps


# ------------------------------------------------------------------ the check
def check(case: Case, ours: Path, mk: Path, exact: list[str]) -> dict[str, Any]:
    reader = Reader()
    fa, fb = reader.names(ours), reader.names(mk)
    report: dict[str, Any] = {
        "missing_in_ours": sorted(set(fb) - set(fa)),
        "missing_in_mergekit": sorted(set(fa) - set(fb)),
        "mismatched": [],
    }
    agreement = Agreement()
    worst: tuple[float, str] = (0.0, "")
    for name in sorted(set(fa) & set(fb)):
        a, b = reader.get(ours, name), reader.get(mk, name)
        if a.shape != b.shape:
            report["mismatched"].append(f"{name}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
            continue
        if a.dtype != b.dtype:  # e.g. mergekit's arcee_fusion writes float32 whatever the recipe's dtype
            report["mismatched"].append(f"{name}: {a.dtype} vs {b.dtype} (compared after casting to {a.dtype})")
            b = b.to(a.dtype)
        agreement.add(a, b)
        if agreement.max_abs > worst[0]:  # where ours and mergekit's differ most (ulps mislead near 0)
            worst = (agreement.max_abs, name)
    report["agreement"] = agreement.summary()
    report["worst_tensor"] = worst[1]
    report["tensors"] = len(set(fa) & set(fb))

    if case.method in REFERENCES or case.method == "passthrough":
        names = [n for n in exact if n in fa and n in fb]
        err_a, err_b, per_tensor = Exactness(), Exactness(), {}
        for name in names:
            ref, scale = reference(case, reader, name)
            ea, eb = Exactness(), Exactness()
            for e, acc, folder in ((ea, err_a, ours), (eb, err_b, mk)):
                got = reader.get(folder, name).to(torch.bfloat16)  # the recipes' dtype (one rounding if not)
                e.add(got, ref, scale)
                acc.add(got, ref, scale)
            per_tensor[name] = {"ours": ea.summary(), "mergekit": eb.summary()}
        report["exact"] = {
            "tensors": names,
            "ours": err_a.summary(),
            "mergekit": err_b.summary(),
            "per_tensor": per_tensor,
            "reference_unverified_elements": UNVERIFIED[0],
        }

    if case.method in RANDOM:
        decoded = {}
        for label, folder in (("ours", ours), ("mergekit", mk)):
            acc = Decoded()
            for name in sorted(fa):
                if name in fb and reader.get(folder, name).dim() == 2:
                    decode_tensor(case, reader, folder, name, acc)
            decoded[label] = acc.summary()
        report["random"] = decoded
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--ours", type=Path, required=True)
    ap.add_argument("--mergekit", type=Path, required=True)
    ap.add_argument("--exact", default=",".join(DEFAULT_EXACT), help="comma-separated tensor names")
    ap.add_argument("--json", type=Path, help="write the report here (default: stdout)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (untimed, between timed runs)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = check(Case.load(args.recipe), args.ours, args.mergekit, args.exact.split(","))
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
