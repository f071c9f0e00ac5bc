"""Every registered method: row-sliced execution equals whole-tensor execution bit for bit; inputs are
never modified; float32 in, float32 out; seeded methods are reproducible and differ across seeds.
On a machine with CUDA, the GPU gives the CPU's bits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from mergekitlite.methods import REGISTRY, MethodSpec
from mergekitlite.methods.apply import merge_in_chunks

# Values for parameters (by recipe name) that make each method do real work on small tensors.
PER_MODEL = {
    "weight": [0.7, 0.4, 1.1],
    "density": [0.5, 0.3, 0.8],
    "gamma": [0.1, 0.05, 0.2],
    "epsilon": [0.1, 0.2, 0.05],
}
GLOBAL = {"t": 0.3, "select_topk": 0.5}
# Further parameter sets worth covering, per method.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "ties": [{"rescale": True}, {"density": (1.0, 1.0, 1.0)}],
    "dare_ties": [{"rescale": False}],
    "breadcrumbs": [{"rescale": True}],
    "della": [{"rescale": False}],
    "sce": [{"select_topk": 1.0}, {"select_topk": 0.0}],
    "nuslerp": [{"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}],
    "model_stock": [{"filter_wise": True}],
    "multislerp": [{"normalize_weights": False}],
}
SHAPES = [(7, 5), (11,), (), (3, 4, 5), (6, 1)]
ROWS = [1, 2, 3, 4]  # 3 and 4 do not divide 7 or 11


def model_count(spec: MethodSpec) -> int:
    return max(spec.min_models, min(3, spec.max_models or 3))


def params_for(spec: MethodSpec, n: int, overrides: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in spec.params:
        if p.name in overrides:
            out[p.name] = overrides[p.name][:n] if p.per_model else overrides[p.name]
        elif p.per_model:
            values = PER_MODEL.get(p.name) or ([0.6, 0.3, 0.8] if p.required else [p.default] * 3)
            out[p.name] = tuple(values[:n])
        else:
            out[p.name] = GLOBAL.get(p.name, 0.4 if p.required else p.default)
    return out


def cases() -> Iterator[Any]:
    for name in sorted(REGISTRY.methods):
        for i, extra in enumerate([{}, *VARIANTS.get(name, [])]):
            yield pytest.param(name, extra, id=f"{name}-{i}")


def inputs(spec: MethodSpec, shape: tuple[int, ...], kind: str, seed: int = 0) -> tuple[Tensor | None, list[Tensor]]:
    """bf16-valued inputs (many equal magnitudes, as real checkpoints), or small integers (ties everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    n = model_count(spec)
    if kind == "bf16":
        base = torch.randn(shape, generator=gen).bfloat16().float()
        models = [(base + 0.1 * torch.randn(shape, generator=gen)).bfloat16().float() for _ in range(n)]
    else:
        base = torch.randint(-2, 3, shape, generator=gen).float()
        models = [base + torch.randint(-3, 4, shape, generator=gen).float() for _ in range(n)]
    return (None if spec.base == "unused" else base), models


def bits(x: Tensor) -> Tensor:
    return x.reshape(-1).view(torch.int32)


@pytest.mark.parametrize(("name", "extra"), list(cases()))
@pytest.mark.parametrize("kind", ["bf16", "integers"])
def test_row_slices_give_the_whole_tensor_bits(name: str, extra: dict[str, Any], kind: str) -> None:
    spec = REGISTRY.methods[name]
    for shape in SHAPES:
        base, models = inputs(spec, shape, kind)
        params = params_for(spec, len(models), extra)
        copies = [t.clone() for t in ([base] if base is not None else []) + models]
        whole = merge_in_chunks(spec, base, models, params, seed=12345)
        assert whole.dtype == torch.float32 and whole.shape == torch.Size(shape)
        for rows in ROWS if shape else []:
            sliced = merge_in_chunks(spec, base, models, params, rows_per_chunk=rows, seed=12345)
            assert torch.equal(bits(sliced), bits(whole)), f"{name} {shape} rows_per_chunk={rows}"
        after = ([base] if base is not None else []) + models
        assert all(torch.equal(a, b) for a, b in zip(after, copies, strict=True)), f"{name} modified an input"


RANDOM = sorted(name for name, spec in REGISTRY.methods.items() if spec.random)


def test_random_methods_are_flagged() -> None:
    assert {"dare_ties", "dare_linear", "della", "della_linear"} <= set(RANDOM)
    for name in RANDOM:
        assert REGISTRY.methods[name].wants_chunk


@pytest.mark.parametrize("name", RANDOM)
def test_seeded_methods_are_reproducible_and_seed_dependent(name: str) -> None:
    spec = REGISTRY.methods[name]
    base, models = inputs(spec, (40, 30), "bf16")
    params = params_for(spec, len(models), {})
    a = merge_in_chunks(spec, base, models, params, seed=1)
    b = merge_in_chunks(spec, base, models, params, seed=1, rows_per_chunk=7)
    c = merge_in_chunks(spec, base, models, params, seed=2)
    assert torch.equal(bits(a), bits(b))
    assert not torch.equal(a, c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "extra"), list(cases()))
def test_gpu_gives_the_cpu_bits(name: str, extra: dict[str, Any]) -> None:
    spec = REGISTRY.methods[name]
    for shape in [(37, 29), (29,)]:
        base, models = inputs(spec, shape, "bf16", seed=3)
        params = params_for(spec, len(models), extra)
        cpu = merge_in_chunks(spec, base, models, params, seed=99, rows_per_chunk=5)
        gpu_base = base.cuda() if base is not None else None
        gpu = merge_in_chunks(spec, gpu_base, [m.cuda() for m in models], params, seed=99, rows_per_chunk=6)
        assert gpu.is_cuda
        assert torch.equal(bits(gpu.cpu()), bits(cpu)), f"{name} {shape}"
