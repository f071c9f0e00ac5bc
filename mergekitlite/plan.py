"""From a validated recipe and the models' headers to a tensor-level task graph.

The planner reads no weights. It decides, for every output tensor, which input tensors feed it,
which method and parameter values apply, its output dtype and shard, and it reports every
inconsistency (missing tensors, shape mismatches, missing parameters) at once, before anything
is written.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mergekitlite.budget import Budget, rows_per_chunk
from mergekitlite.errors import PlanError
from mergekitlite.io.safetensors_header import (
    CODE_BY_NAME,
    FLOAT_CODES,
    NAME_BY_CODE,
    ShardLayout,
    TensorInfo,
    layout_shard,
)
from mergekitlite.methods import MethodSpec, get_method
from mergekitlite.methods.apply import tensor_seed
from mergekitlite.methods.registry import param_kind
from mergekitlite.recipe import LoadedRecipe, Parameters, Recipe, Rule
from mergekitlite.roles import before_layers, is_vocab_tensor, split_layer
from mergekitlite.rowrules import eos_warnings, token_rules, vocab_layout
from mergekitlite.settings import evaluate, is_gradient, name_matches
from mergekitlite.sources import ModelSource, open_sources
from mergekitlite.taskgraph import InputRef, Plan, Problems, TensorTask, lookup_tensor
from mergekitlite.tokens import read_token_info

DEFAULT_SHARD_SIZE = 5 * 1000**3


@dataclass(frozen=True)
class _Source:
    model: str
    start: int  # first layer taken
    params: Parameters | None


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_Source, ...]
    length: int
    base_model: str | None
    params: Parameters | None


def _layers_of(src: ModelSource) -> int:
    prefix = src.main_layer_prefix()
    return src.layer_counts[prefix] if prefix is not None else 0


def _normalize_slices(
    recipe: Recipe, spec: MethodSpec, sources: Mapping[str, ModelSource], problems: Problems
) -> list[_Slice]:
    if recipe.slices:
        out = []
        for i, s in enumerate(recipe.slices):
            lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
            if len(lengths) != 1:
                problems.add(f"slices[{i}]: every source must span the same number of layers, got {sorted(lengths)}")
                continue
            for j, src in enumerate(s.sources):
                have = _layers_of(sources[src.model])
                if src.layer_range[1] > have:
                    problems.add(
                        f"slices[{i}].sources[{j}].layer_range: {list(src.layer_range)} is past the end of "
                        f"{src.model!r}, which has {have} layers"
                    )
            srcs = tuple(_Source(src.model, src.layer_range[0], src.parameters) for src in s.sources)
            base = s.base_model or recipe.base_model
            if spec.base != "unused" and base and base not in {x.model for x in srcs}:
                srcs += (_Source(base, s.sources[0].layer_range[0], None),)
            out.append(_Slice(srcs, lengths.pop(), base, s.parameters))
        return out

    assert recipe.models is not None
    models = [(m.model, m.parameters) for m in recipe.models]
    if spec.base != "unused" and recipe.base_model and recipe.base_model not in {m for m, _ in models}:
        models.append((recipe.base_model, None))
    counts = {m: _layers_of(sources[m]) for m, _ in models}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{m!r} has {n}" for m, n in counts.items())
        problems.add(f"the models have different numbers of layers ({listing}); use 'slices' to choose layers")
    n = max(counts.values(), default=0)
    return [_Slice(tuple(_Source(m, 0, p) for m, p in models), n, recipe.base_model, None)]


def _coerce(name: str, value: Any, default: Any, where: str, problems: Problems) -> Any:
    """The value as the method wants it. Booleans written as 0/1 are accepted, as mergekit (whose
    older tools wrote every parameter as a float) does; anything else of the wrong kind is a problem
    (the recipe loader reports most of them earlier, with positions)."""
    kind = param_kind(default)
    if kind == "bool" and isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if kind == "bool" and not isinstance(value, bool):
        problems.add_grouped(f"type:{name}", f"{where}: parameter '{name}' must be true or false, got {value!r}")
    elif kind == "number" and isinstance(value, (bool, str)):
        problems.add_grouped(f"type:{name}", f"{where}: parameter '{name}' must be a number, got {value!r}")
    return value


def _first(levels: Sequence[Parameters | None], pname: str, tensor: str, t: float) -> Any | None:
    for level in levels:
        if level and pname in level:
            value = evaluate(level[pname], tensor, t)
            if value is not None:
                return value
    return None


def _resolve_params(
    spec: MethodSpec,
    out_name: str,
    t: float,
    model_levels: Sequence[Sequence[Parameters | None]],
    model_names: Sequence[str],
    global_levels: Sequence[Parameters | None],
    problems: Problems,
) -> tuple[tuple[str, Any], ...]:
    resolved: dict[str, Any] = {}
    for p in spec.global_params:
        value = _first(global_levels, p.name, out_name, t)
        if value is None:
            if p.required:
                problems.add_grouped(f"missing:{p.name}", f"{out_name}: {spec.name} needs parameter '{p.name}'")
                continue
            value = p.default
        else:
            value = _coerce(p.name, value, p.default, out_name, problems)
        resolved[p.name] = value
    for p in spec.model_params:
        values = []
        for levels, model in zip(model_levels, model_names):
            value = _first(levels, p.name, out_name, t)
            if value is None:
                if p.required:
                    problems.add_grouped(
                        f"missing:{p.name}:{model}",
                        f"{out_name}: {spec.name} needs parameter '{p.name}' for model {model!r} "
                        "(no rule or filter gives one for this tensor)",
                    )
                value = p.default
            else:
                value = _coerce(p.name, value, p.default, f"{out_name} (model {model!r})", problems)
            values.append(value)
        resolved[p.name] = tuple(values)
    if spec.name == "linear" and resolved.get("normalize") and isinstance(resolved.get("weight"), tuple):
        weights = resolved["weight"]
        if all(isinstance(w, (int, float)) for w in weights) and sum(weights) == 0:
            problems.add_grouped(
                "zero-sum", f"{out_name}: linear with normalize: the weights sum to 0 (division by zero)"
            )
    return tuple(sorted(resolved.items()))


def _rule_for(rules: Sequence[Rule], name: str) -> tuple[int, Rule] | None:
    return next(((i, r) for i, r in enumerate(rules) if name_matches(r.match, name)), None)


def _shards(
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


def _donors(recipe: Recipe, slices: Sequence[_Slice]) -> tuple[str, str]:
    first = slices[0].sources[0].model
    config_donor = recipe.base_model or first
    tok = recipe.tokenizer.source if recipe.tokenizer else recipe.tokenizer_source
    tokenizer_donor = config_donor if tok in (None, "base") else tok
    return config_donor, tokenizer_donor


def _out_config(donor: ModelSource, out_dtype: str | None, total_layers: int | None) -> dict[str, Any]:
    cfg = json.loads(json.dumps(donor.config))
    if out_dtype:
        keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
        for k in keys:
            cfg[k] = out_dtype
    if total_layers is not None:
        for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if k in cfg:
                cfg[k] = total_layers
                break
    return cfg


def build_plan(
    loaded: LoadedRecipe,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shard_params: int | None = None,
    compute_dtype: str | None = None,
    budget: Budget | None = None,
    random_seed: int | None = None,
    aliases: Mapping[str, Path] | None = None,
) -> Plan:
    """Plan the merge of ``loaded``; raises PlanError listing every problem found."""
    recipe = loaded.recipe
    spec = get_method(recipe.merge_method)
    problems = Problems()
    warnings = list(loaded.warnings)

    sources, missing = open_sources(recipe.referenced_models(), loaded.base_dir, aliases)
    tok = recipe.tokenizer.source if recipe.tokenizer else recipe.tokenizer_source
    if tok not in (None, "base", "union") and tok not in sources:
        more, errs = open_sources([tok], loaded.base_dir, aliases)
        sources.update(more)
        missing += errs
    if missing:
        raise PlanError(missing)

    slices = _normalize_slices(recipe, spec, sources, problems)
    if problems.lines:
        raise PlanError(problems.all())

    reference = sources[recipe.base_model or slices[0].sources[0].model]
    ref_prefix = reference.main_layer_prefix()
    any_layers = any(src.layer_counts for src in sources.values())
    if not any_layers:
        for where, params in _all_params(recipe):
            for pname, setting in params.items():
                if is_gradient(setting):
                    problems.add(
                        f"{where}.{pname}: a gradient (list of values over the layers) needs numbered layers, "
                        f"but no model has any (e.g. {reference.ref!r} has tensors like "
                        f"{next(iter(reference.tensors), '?')!r}); give a single value"
                    )

    config_donor, tokenizer_donor = _donors(recipe, slices)
    tok_info = read_token_info(sources[tokenizer_donor].path)
    tok_cfg = recipe.tokenizer
    vocab_out: dict[str, int] = {}
    out_code_global = CODE_BY_NAME[recipe.out_dtype_name] if recipe.out_dtype_name else None
    cdtype = compute_dtype or recipe.compute_dtype
    rules = recipe.rules or []
    tasks: list[TensorTask] = []
    used_inputs: dict[str, set[str]] = {m: set() for m in sources}

    def plan_tensor(out_name: str, layer: int | None, t: float, slc: _Slice, in_names: Sequence[str]) -> None:
        # Resolve the inputs of every source.
        infos: list[TensorInfo | None] = []
        for src, in_name in zip(slc.sources, in_names):
            info = lookup_tensor(sources[src.model], in_name)
            if info is None:
                problems.add_grouped(
                    f"missing:{src.model}",
                    f"cannot merge {out_name!r}: model {src.model!r} has no tensor {in_name!r}",
                )
            else:
                used_inputs[src.model].add(info.name)
            infos.append(info)
        if any(i is None for i in infos):
            return
        # The output follows the reference model (base, else first model) in dtype and layout.
        lead = next((k for k, src in enumerate(slc.sources) if src.model == reference.ref), 0)
        first = infos[lead]
        assert first is not None
        shapes = {src.model: info.shape for src, info in zip(slc.sources, infos) if info is not None}
        out_shape, merge_rows, row_rules = first.shape, None, ()
        refs = [InputRef(src.model, info) for src, info in zip(slc.sources, infos) if info is not None]
        donor_info = lookup_tensor(sources[tokenizer_donor], out_name)
        donor_ref = InputRef(tokenizer_donor, donor_info) if donor_info is not None else None
        if len(set(shapes.values())) > 1:
            policy = tok_cfg.vocab_policy if tok_cfg else "keep"
            layout = vocab_layout(out_name, refs, refs[lead], donor_ref, policy)
            if layout is None:
                listing = ", ".join(f"{list(s)} in {m!r}" for m, s in shapes.items())
                problems.add_grouped("shape", f"cannot merge {out_name!r}: shape {listing}")
                return
            out_shape, merge_rows, row_rules, note = layout
            warnings.append(note)
        if is_vocab_tensor(out_name, out_shape):
            vocab_out[out_name] = out_shape[0]
            row_rules = row_rules + token_rules(
                out_name, out_shape, tok_cfg, tok_info, sources, tokenizer_donor, problems
            )
        out_code = out_code_global if (out_code_global and first.dtype in FLOAT_CODES) else first.dtype

        rule = _rule_for(rules, out_name)
        if rule is not None and rule[1].take is not None:
            i, r = rule
            assert r.take is not None
            taken = lookup_tensor(sources[r.take], out_name)
            if taken is None:
                problems.add_grouped(
                    f"missing:{r.take}", f"rules[{i}]: model {r.take!r} has no tensor {out_name!r} to take"
                )
                return
            if taken.shape != first.shape:
                problems.add_grouped(
                    "shape",
                    f"rules[{i}]: {out_name!r} is {list(taken.shape)} in {r.take!r} "
                    f"but {list(first.shape)} in the merge",
                )
                return
            used_inputs[r.take].add(taken.name)
            code = out_code_global if (out_code_global and taken.dtype in FLOAT_CODES) else taken.dtype
            tasks.append(
                TensorTask(
                    out_name,
                    "passthrough",
                    None,
                    (InputRef(r.take, taken),),
                    (("scale", (None,)),),
                    taken.shape,
                    code,
                    layer,
                    t,
                    why=f"rules[{i}]: taken from {r.take}",
                )
            )
            return

        if first.dtype not in FLOAT_CODES:
            src0 = slc.sources[lead].model
            tasks.append(
                TensorTask(
                    out_name,
                    "passthrough",
                    None,
                    (InputRef(src0, first),),
                    (("scale", (None,)),),
                    first.shape,
                    first.dtype,
                    layer,
                    t,
                    why=f"not floating point: copied from {src0}",
                )
            )
            return

        method = spec
        rule_params: Parameters | None = None
        why = ""
        if rule is not None:
            i, r = rule
            assert r.method is not None
            method = get_method(r.method)
            rule_params = r.parameters
            why = f"rules[{i}]: {method.name}"

        base_ref: InputRef | None = None
        model_refs: list[InputRef] = []
        model_levels: list[list[Parameters | None]] = []
        for src, info in zip(slc.sources, infos):
            assert info is not None
            if method.base != "unused" and src.model == slc.base_model:
                base_ref = InputRef(src.model, info)
                continue
            model_refs.append(InputRef(src.model, info))
            model_levels.append([rule_params, src.params, slc.params, recipe.parameters])
        if method.base == "required" and base_ref is None:
            problems.add(f"{out_name}: {method.name} needs a base model; set 'base_model'")
            return
        if len(model_refs) < method.min_models or (method.max_models and len(model_refs) > method.max_models):
            problems.add_grouped(
                f"count:{method.name}",
                f"{out_name}: {method.name} takes {method.min_models}..{method.max_models or 'any'} models "
                f"besides the base, got {len(model_refs)}",
            )
            return
        params = _resolve_params(
            method,
            out_name,
            t,
            model_levels,
            [m.model for m in model_refs],
            [rule_params, slc.params, recipe.parameters],
            problems,
        )
        tasks.append(
            TensorTask(
                out_name,
                method.name,
                base_ref,
                tuple(model_refs),
                params,
                out_shape,
                out_code,
                layer,
                t,
                why,
                merge_rows=merge_rows,
                row_rules=row_rules,
            )
        )

    def t_of(idx: int, count: int) -> float:
        return idx / (count - 1) if count > 1 else 1.0

    if not recipe.slices:
        slc = slices[0]
        for name in reference.tensors:
            parts = split_layer(name)
            layer, t = (None, 0.0) if parts is None else (parts[1], t_of(parts[1], reference.layer_counts[parts[0]]))
            plan_tensor(name, layer, t, slc, [name] * len(slc.sources))
        total_layers = None
    else:
        pre, post = _split_outer(reference, ref_prefix)
        first_slc, last_slc = slices[0], slices[-1]
        for name in pre:
            plan_tensor(name, None, 0.0, first_slc, [name] * len(first_slc.sources))
        k = 0
        for slc in slices:
            lead = sources[slc.sources[0].model]
            lead_prefix = lead.main_layer_prefix() or ""
            for o in range(slc.length):
                t = t_of(o, slc.length)
                src_layer = slc.sources[0].start + o
                rests = [
                    rest
                    for n in lead.tensors
                    if (p := split_layer(n)) and p[0] == lead_prefix and p[1] == src_layer
                    for rest in [p[2]]
                ]
                for rest in rests:
                    out_name = f"{ref_prefix}{k}.{rest}"
                    in_names = [f"{sources[s.model].main_layer_prefix()}{s.start + o}.{rest}" for s in slc.sources]
                    plan_tensor(out_name, k, t, slc, in_names)
                k += 1
        for name in post:
            plan_tensor(name, None, 0.0, last_slc, [name] * len(last_slc.sources))
        total_layers = k

    if problems.lines or problems.grouped:
        raise PlanError(problems.all())

    for src in sources.values():
        unused = [n for n in src.tensors if n not in used_inputs.get(src.ref, set())]
        relevant = recipe.slices is None and src.ref in {s.model for s in slices[0].sources}
        if unused and relevant:
            warnings.append(
                f"{len(unused)} tensor(s) of {src.ref!r} are not in the output (the output follows "
                f"{reference.ref!r}), e.g. {unused[0]!r}"
            )

    budget = budget or Budget()
    seed = random_seed if random_seed is not None else recipe.random_seed
    if seed is None:
        # Deterministic by default: the same recipe text gives the same random draws.
        seed = int.from_bytes(hashlib.sha256(loaded.text.encode()).digest()[:4], "little")
    sized = []
    for task in tasks:
        spec = get_method(task.method)
        cost = task.row_cost(cdtype, budget.on_gpu)
        rows = rows_per_chunk(task.rows, task.row_elements, cost, budget, name=task.name)
        sized.append(replace(task, chunk_rows=rows, seed=tensor_seed(seed, task.name) if spec.random else 0))
    tasks = sized

    warnings += eos_warnings(recipe, sources, tokenizer_donor)
    shards, shard_of = _shards(tasks, shard_size, shard_params)
    out_cfg = _out_config(sources[config_donor], recipe.out_dtype_name or _dominant_dtype(tasks), total_layers)
    if vocab_out and "vocab_size" in out_cfg:
        out_cfg["vocab_size"] = max(vocab_out.values())
    return Plan(
        loaded=loaded,
        sources=sources,
        tasks=tuple(tasks),
        shards=shards,
        shard_of=shard_of,
        compute_dtype=cdtype,
        config_donor=config_donor,
        tokenizer_donor=tokenizer_donor,
        out_config=out_cfg,
        budget=budget,
        random_seed=seed,
        warnings=tuple(warnings),
    )


def _dominant_dtype(tasks: Sequence[TensorTask]) -> str | None:
    sizes: dict[str, int] = {}
    for t in tasks:
        sizes[t.out_dtype] = sizes.get(t.out_dtype, 0) + t.nbytes
    if not sizes:
        return None
    code = max(sizes, key=lambda c: sizes[c])
    return NAME_BY_CODE.get(code)


def _split_outer(reference: ModelSource, prefix: str | None) -> tuple[list[str], list[str]]:
    """Tensors outside the layer stack: embeddings go before the layers, the rest (final norm, lm_head) after."""
    pre, post = [], []
    for name in reference.tensors:
        parts = split_layer(name)
        if parts is not None and parts[0] == prefix:
            continue
        (pre if before_layers(name) else post).append(name)
    return pre, post


def _all_params(recipe: Recipe) -> list[tuple[str, Parameters]]:
    out: list[tuple[str, Parameters]] = []
    if recipe.parameters:
        out.append(("parameters", recipe.parameters))
    for i, m in enumerate(recipe.models or ()):
        if m.parameters:
            out.append((f"models[{i}].parameters", m.parameters))
    for i, s in enumerate(recipe.slices or ()):
        if s.parameters:
            out.append((f"slices[{i}].parameters", s.parameters))
        for j, src in enumerate(s.sources):
            if src.parameters:
                out.append((f"slices[{i}].sources[{j}].parameters", src.parameters))
    return out
