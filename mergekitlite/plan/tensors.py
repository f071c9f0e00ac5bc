"""Stage 3 — one output tensor: its inputs, its shape and row rules, and how it is made (taken from a
model by a rule, copied because it is not floating point, or merged by the recipe's or a rule's method
with the parameters that apply to it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergekitlite.io.safetensors_header import FLOAT_CODES
from mergekitlite.lora.tensor import model_dtype
from mergekitlite.methods import MethodSpec, get_method
from mergekitlite.plan.inputs import lookup_tensor
from mergekitlite.plan.layout import OutputSlot, first_rule
from mergekitlite.plan.params import Levels, resolve_params
from mergekitlite.plan.problems import Problems
from mergekitlite.plan.rowrules import token_rules, vocab_layout
from mergekitlite.plan.vocab import OutputVocab, gathered_inputs
from mergekitlite.recipe import Recipe, Rule
from mergekitlite.roles import is_vocab_tensor
from mergekitlite.sources import ModelSource
from mergekitlite.taskgraph import InputRef, RowRule, TensorTask
from mergekitlite.tokens import TokenInfo


@dataclass(frozen=True)
class TensorContext:
    """What every tensor's planning reads; made once per plan."""

    recipe: Recipe
    spec: MethodSpec  # the recipe's method
    sources: Mapping[str, ModelSource]
    reference: ModelSource  # the output follows it in names, order and dtypes
    tokenizer_donor: str
    tokens: TokenInfo  # the tokenizer donor's tokens
    out_dtype: str | None  # the recipe's output dtype (safetensors code) for floating-point tensors
    vocab: OutputVocab | None = None  # the output vocabulary, when inputs are re-indexed by token text


@dataclass(frozen=True)
class OutputShape:
    shape: tuple[int, ...]
    merge_rows: int | None  # rows the method merges, when fewer than the output's (vocabularies differ)
    row_rules: tuple[RowRule, ...]
    note: str | None  # a warning to show (how differing vocabularies are resolved)


@dataclass(frozen=True)
class PlannedTensor:
    task: TensorTask
    note: str | None = None


def plan_tensor(slot: OutputSlot, ctx: TensorContext, problems: Problems) -> PlannedTensor | None:
    """The task for ``slot``, or None with the reasons added to ``problems``."""
    rule = first_rule(ctx.recipe.rules or (), slot.name)
    lead = lead_input(slot, ctx.reference)
    if rule is not None and rule[1].take is not None:
        # Taken whole from one model: the other inputs need not have it (that is how a tensor the merged
        # models lack is added), but where they do, its shape must be theirs.
        have = resolve_inputs(slot, ctx.sources, Problems())
        shape = have[lead].tensor.shape if have is not None else None
        task = taken(slot, rule[0], rule[1].take, shape, ctx, problems)
        return None if task is None else PlannedTensor(task)
    refs = resolve_inputs(slot, ctx.sources, problems)
    if refs is None:
        return None
    if ctx.vocab is not None and is_vocab_tensor(slot.name, refs[lead].tensor.shape):
        refs = gathered_inputs(slot.name, refs, slot.slice.base_model, ctx.vocab, ctx.sources, problems)
    out = output_shape(slot.name, refs, lead, ctx, problems)
    if out is None:
        return None
    first = refs[lead].tensor
    # Without a recipe dtype the output keeps the model's stored dtype (a LoRA'd input is read as float32).
    out_dtype = ctx.out_dtype if (ctx.out_dtype and first.dtype in FLOAT_CODES) else model_dtype(first)
    if first.dtype not in FLOAT_CODES:
        why = f"not floating point: copied from {refs[lead].model}"
        return PlannedTensor(TensorTask.copy(slot.name, refs[lead], first.dtype, slot.layer, slot.t, why), out.note)
    task = merged(slot, refs, out, out_dtype, rule, ctx, problems)
    return None if task is None else PlannedTensor(task, out.note)


def resolve_inputs(slot: OutputSlot, sources: Mapping[str, ModelSource], problems: Problems) -> list[InputRef] | None:
    """The input tensor of every source of the slot's slice; None (and a problem per missing one) if any is missing."""
    refs: list[InputRef] = []
    for src, in_name in zip(slot.slice.sources, slot.inputs):
        info = lookup_tensor(sources[src.model], in_name)
        if info is None:
            problems.add(
                f"cannot merge {slot.name!r}: model {src.model!r} has no tensor {in_name!r}",
                group=f"missing:{src.model}",
            )
        else:
            refs.append(InputRef(src.model, info))
    return refs if len(refs) == len(slot.inputs) else None


def lead_input(slot: OutputSlot, reference: ModelSource) -> int:
    """Which input the output follows in dtype and shape: the reference model's, else the first."""
    return next((k for k, src in enumerate(slot.slice.sources) if src.model == reference.ref), 0)


def output_shape(
    name: str, refs: Sequence[InputRef], lead: int, ctx: TensorContext, problems: Problems
) -> OutputShape | None:
    """The output's shape: the inputs' common shape, or — for embeddings and output heads whose vocabularies
    differ — the tokenizer donor's rows, with row rules for the rows only some inputs have; plus the rows of
    single tokens the recipe sets."""
    shapes = {r.model: r.tensor.shape for r in refs}
    shape, merge_rows, rules, note = refs[lead].tensor.shape, None, (), None
    if ctx.vocab is not None and is_vocab_tensor(name, shape) and len({s[1:] for s in shapes.values()}) == 1:
        shape = (ctx.vocab.rows, *shape[1:])  # rows by token text (plan/vocab.py)
    elif len(set(shapes.values())) > 1:
        donor_info = lookup_tensor(ctx.sources[ctx.tokenizer_donor], name)
        donor = InputRef(ctx.tokenizer_donor, donor_info) if donor_info is not None else None
        policy = (ctx.recipe.tokenizer.vocab_policy if ctx.recipe.tokenizer else None) or "keep"
        layout = vocab_layout(name, refs, refs[lead], donor, policy)
        if layout is None:
            listing = ", ".join(f"{list(s)} in {m!r}" for m, s in shapes.items())
            problems.add(f"cannot merge {name!r}: shape {listing}", group="shape")
            return None
        shape, merge_rows, rules, note = layout
    if is_vocab_tensor(name, shape):
        rules += token_rules(
            name,
            shape,
            ctx.recipe.tokenizer,
            ctx.tokens,
            ctx.sources,
            ctx.tokenizer_donor,
            problems,
            tokens_merged=ctx.vocab is not None,
        )
    return OutputShape(shape, merge_rows, rules, note)


def taken(
    slot: OutputSlot, index: int, model: str, shape: tuple[int, ...] | None, ctx: TensorContext, problems: Problems
) -> TensorTask | None:
    """``rules[index]: {take: model}``: the tensor copied from ``model`` (cast to the output dtype); ``shape``: the
    merge inputs' shape when they have the tensor."""
    info = lookup_tensor(ctx.sources[model], slot.name)
    if info is None:
        problems.add(f"rules[{index}]: model {model!r} has no tensor {slot.name!r} to take", group=f"missing:{model}")
        return None
    if shape is not None and info.shape != shape:
        problems.add(
            f"rules[{index}]: {slot.name!r} is {list(info.shape)} in {model!r} but {list(shape)} in the merge",
            group="shape",
        )
        return None
    out_dtype = ctx.out_dtype if (ctx.out_dtype and info.dtype in FLOAT_CODES) else model_dtype(info)
    why = f"rules[{index}]: taken from {model}"
    return TensorTask.copy(slot.name, InputRef(model, info), out_dtype, slot.layer, slot.t, why)


def merged(
    slot: OutputSlot,
    refs: Sequence[InputRef],
    out: OutputShape,
    out_dtype: str,
    rule: tuple[int, Rule] | None,
    ctx: TensorContext,
    problems: Problems,
) -> TensorTask | None:
    """The tensor merged by the recipe's method, or by the method of the rule that matches it."""
    method, rule_params, why = ctx.spec, None, ""
    if rule is not None:
        index, r = rule
        assert r.method is not None
        method, rule_params, why = get_method(r.method), r.parameters, f"rules[{index}]: {get_method(r.method).name}"
    base: InputRef | None = None
    models: list[InputRef] = []
    levels: list[Levels] = []
    slc = slot.slice
    for src, ref in zip(slc.sources, refs):
        if method.base != "unused" and src.model == slc.base_model:
            base = ref
            continue
        models.append(ref)
        levels.append([rule_params, src.params, slc.params, slc.module_params, ctx.recipe.parameters])
    if method.base == "required" and base is None:
        problems.add(f"{slot.name}: {method.name} needs a base model; set 'base_model'")
        return None
    if len(models) < method.min_models or (method.max_models and len(models) > method.max_models):
        problems.add(
            f"{slot.name}: {method.name} takes {method.min_models}..{method.max_models or 'any'} models "
            f"besides the base, got {len(models)}",
            group=f"count:{method.name}",
        )
        return None
    params = resolve_params(
        method,
        slot.name,
        slot.t,
        levels,
        [m.model for m in models],
        [rule_params, slc.params, slc.module_params, ctx.recipe.parameters],
        problems,
    )
    return TensorTask(
        slot.name,
        method.name,
        base,
        tuple(models),
        params,
        out.shape,
        out_dtype,
        slot.layer,
        slot.t,
        why,
        merge_rows=out.merge_rows,
        row_rules=out.row_rules,
    )
