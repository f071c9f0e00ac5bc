"""Stage 5 — what the whole plan needs once every tensor is planned: per-tensor seeds and rows per chunk
(from the memory budget), the output shards, the donors of config and tokenizer, and the output's
config.json."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from mergekitlite.budget import Budget, rows_per_chunk
from mergekitlite.io.safetensors_header import NAME_BY_CODE, ShardLayout, layout_shard
from mergekitlite.methods import get_method
from mergekitlite.methods.registry import tensor_seed
from mergekitlite.plan.inputs import tokenizer_choice
from mergekitlite.plan.layout import Slice
from mergekitlite.recipe import LoadedRecipe, Recipe
from mergekitlite.roles import MODULE_LAYER_KEYS, is_vocab_tensor
from mergekitlite.sources import ModelSource
from mergekitlite.taskgraph import TensorTask


def donors(recipe: Recipe, slices: Sequence[Slice]) -> tuple[str, str]:
    """(config donor, tokenizer donor): config.json comes from the base (else the first model); tokenizer,
    chat template and generation config from ``tokenizer_source`` (default, ``base`` and ``union``: the config
    donor, whose tokenizer a union extends)."""
    config_donor = recipe.base_model or slices[0].sources[0].model
    tok = tokenizer_choice(recipe)
    return config_donor, config_donor if tok in (None, "base", "union") else tok


def plan_seed(loaded: LoadedRecipe, override: int | None) -> int:
    """The seed of random methods: the command line's, else the recipe's, else derived from the recipe
    text (deterministic by default: the same recipe gives the same draws)."""
    seed = override if override is not None else loaded.recipe.random_seed
    if seed is None:
        seed = int.from_bytes(hashlib.sha256(loaded.text.encode()).digest()[:4], "little")
    return seed


def size_chunks(tasks: Sequence[TensorTask], compute_dtype: str, budget: Budget, seed: int) -> list[TensorTask]:
    """Each task with its rows per chunk (the largest that fits the budget) and, for random methods, its seed."""
    sized = []
    for task in tasks:
        cost = task.row_cost(compute_dtype, budget.on_gpu)
        rows = rows_per_chunk(task.rows, task.row_elements, cost, budget, name=task.name)
        random = get_method(task.method).random
        sized.append(replace(task, chunk_rows=rows, seed=tensor_seed(seed, task.name) if random else 0))
    return sized


def layout_shards(
    tasks: Sequence[TensorTask], shard_size: int, shard_params: int | None = None
) -> tuple[tuple[ShardLayout, ...], dict[str, str]]:
    """Tensors in plan order, cut into shards of at most ``shard_size`` bytes (or ``shard_params``
    parameters, mergekit's unit); a tensor larger than that gets a shard of its own."""
    groups: list[list[TensorTask]] = [[]]
    size = 0
    limit = shard_size if shard_params is None else shard_params
    for t in tasks:
        amount = t.nbytes if shard_params is None else math.prod(t.shape)
        if groups[-1] and size + amount > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += amount
    n = len(groups)
    layouts = []
    shard_of: dict[str, str] = {}
    for i, group in enumerate(groups):
        filename = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        layouts.append(layout_shard(filename, [(t.name, t.out_dtype, t.shape) for t in group]))
        for t in group:
            shard_of[t.name] = filename
    return tuple(layouts), shard_of


def dominant_dtype(tasks: Sequence[TensorTask]) -> str | None:
    """The dtype (name) that holds most of the output's bytes."""
    sizes: dict[str, int] = {}
    for t in tasks:
        sizes[t.out_dtype] = sizes.get(t.out_dtype, 0) + t.nbytes
    if not sizes:
        return None
    return NAME_BY_CODE.get(max(sizes, key=lambda c: sizes[c]))


def output_config(
    donor: ModelSource,
    tasks: Sequence[TensorTask],
    out_dtype: str | None,
    layers: int | None,
    module_layers: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The donor's config.json with the output's dtype, layer count (slices; per module for ``modules:``) and
    vocabulary size."""
    cfg: dict[str, Any] = json.loads(json.dumps(donor.config))
    dtype = out_dtype or dominant_dtype(tasks)
    if dtype:
        for k in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
            cfg[k] = dtype
    if layers is not None:
        key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in cfg), None)
        if key is not None:
            cfg[key] = layers
    for module, count in (module_layers or {}).items():
        for dotted in MODULE_LAYER_KEYS.get(module, ()):
            *path, key = dotted.split(".")
            node = cfg
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and key in node:
                node[key] = count
                break
    vocab = [t.shape[0] for t in tasks if is_vocab_tensor(t.name, t.shape)]
    if vocab and "vocab_size" in cfg:
        cfg["vocab_size"] = max(vocab)
    return cfg
