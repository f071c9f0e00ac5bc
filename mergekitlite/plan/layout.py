"""Stage 2 — which output tensors there are and which input tensors feed each.

A ``models:`` recipe is one slice over whole models (as mergekit normalises it): the output has the
reference model's tensors, in its order and with its names. A ``slices:`` recipe stacks layer ranges:
output layer k of slice s reads layer ``start + o`` of each source, renumbered into the reference model's
layer prefix; tensors outside the layers come from the first slice (embeddings) and the last (the rest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergekitlite.methods import MethodSpec
from mergekitlite.plan.inputs import lookup_tensor
from mergekitlite.plan.problems import Problems
from mergekitlite.recipe import Parameters, Recipe, Rule
from mergekitlite.roles import Role, before_layers, role_of, split_layer
from mergekitlite.settings import name_matches
from mergekitlite.sources import ModelSource


@dataclass(frozen=True)
class SliceSource:
    model: str
    start: int  # first layer taken
    params: Parameters | None


@dataclass(frozen=True)
class Slice:
    sources: tuple[SliceSource, ...]
    length: int  # layers
    base_model: str | None
    params: Parameters | None


@dataclass(frozen=True)
class OutputSlot:
    """One output tensor before anything about its inputs is known."""

    name: str
    layer: int | None  # output layer index; None outside the layers
    t: float  # position in its layer stack, 0..1, for gradients (0 outside the layers)
    slice: Slice
    inputs: tuple[str, ...]  # the input tensor's name in each of ``slice.sources``


@dataclass(frozen=True)
class Layout:
    slots: tuple[OutputSlot, ...]
    layers: int | None  # output layer count when the recipe restacks layers (slices), else None


def layer_count(src: ModelSource) -> int:
    prefix = src.main_layer_prefix()
    return src.layer_counts[prefix] if prefix is not None else 0


def normalize(recipe: Recipe, spec: MethodSpec, sources: Mapping[str, ModelSource]) -> list[Slice]:
    """The recipe as slices: a ``models:`` recipe is one slice over whole models. The base model joins
    every slice's sources when the method uses one and the recipe does not list it. Raises PlanError."""
    problems = Problems()
    if recipe.slices:
        made = [_layer_slice(recipe, spec, sources, i, problems) for i in range(len(recipe.slices))]
        out = [s for s in made if s is not None]
    else:
        out = [_whole_models(recipe, spec, sources, problems)]
    problems.raise_if_any()
    return out


def _with_base(
    spec: MethodSpec, base: str | None, srcs: tuple[SliceSource, ...], start: int
) -> tuple[SliceSource, ...]:
    """The slice's sources, plus the base model when the method uses one and the recipe does not list it."""
    if spec.base != "unused" and base and base not in {x.model for x in srcs}:
        return (*srcs, SliceSource(base, start, None))
    return srcs


def _layer_slice(
    recipe: Recipe, spec: MethodSpec, sources: Mapping[str, ModelSource], i: int, problems: Problems
) -> Slice | None:
    s = recipe.slices[i]  # type: ignore[index]
    lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
    if len(lengths) != 1:
        problems.add(f"slices[{i}]: every source must span the same number of layers, got {sorted(lengths)}")
        return None
    for j, src in enumerate(s.sources):
        have = layer_count(sources[src.model])
        if src.layer_range[1] > have:
            problems.add(
                f"slices[{i}].sources[{j}].layer_range: {list(src.layer_range)} is past the end of "
                f"{src.model!r}, which has {have} layers"
            )
    base = s.base_model or recipe.base_model
    srcs = tuple(SliceSource(src.model, src.layer_range[0], src.parameters) for src in s.sources)
    return Slice(_with_base(spec, base, srcs, s.sources[0].layer_range[0]), lengths.pop(), base, s.parameters)


def _whole_models(recipe: Recipe, spec: MethodSpec, sources: Mapping[str, ModelSource], problems: Problems) -> Slice:
    assert recipe.models is not None
    srcs = _with_base(spec, recipe.base_model, tuple(SliceSource(m.model, 0, m.parameters) for m in recipe.models), 0)
    counts = {src.model: layer_count(sources[src.model]) for src in srcs}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{m!r} has {n}" for m, n in counts.items())
        problems.add(f"the models have different numbers of layers ({listing}); use 'slices' to choose layers")
    return Slice(srcs, max(counts.values(), default=0), recipe.base_model, None)


def reference_model(recipe: Recipe, slices: Sequence[Slice]) -> str:
    """The model the output follows in tensor names, order and dtypes: the base, else the first model."""
    return recipe.base_model or slices[0].sources[0].model


def _position(index: int, count: int) -> float:
    """t of layer ``index`` of ``count`` (mergekit: i/(n−1); a single layer is at 1)."""
    return index / (count - 1) if count > 1 else 1.0


def enumerate_outputs(
    recipe: Recipe, slices: Sequence[Slice], sources: Mapping[str, ModelSource], reference: ModelSource
) -> Layout:
    """Every output tensor, in output order, with the input tensor names that feed it."""
    if not recipe.slices:
        return Layout(tuple(_whole_model_slots(slices[0], reference)), None)
    return _restacked(slices, sources, reference)


def _whole_model_slots(slc: Slice, reference: ModelSource) -> list[OutputSlot]:
    slots = []
    for name in reference.tensors:
        parts = split_layer(name)
        layer, t = (None, 0.0) if parts is None else (parts[1], _position(parts[1], reference.layer_counts[parts[0]]))
        slots.append(OutputSlot(name, layer, t, slc, (name,) * len(slc.sources)))
    return slots


def _restacked(slices: Sequence[Slice], sources: Mapping[str, ModelSource], reference: ModelSource) -> Layout:
    prefix = reference.main_layer_prefix()
    outer = [n for n in reference.tensors if not ((p := split_layer(n)) is not None and p[0] == prefix)]
    first, last = slices[0], slices[-1]
    slots = [OutputSlot(n, None, 0.0, first, (n,) * len(first.sources)) for n in outer if before_layers(n)]
    k = 0
    for slc in slices:
        lead = sources[slc.sources[0].model]
        lead_prefix = lead.main_layer_prefix() or ""
        for o in range(slc.length):
            src_layer = slc.sources[0].start + o
            for n in lead.tensors:
                p = split_layer(n)
                if p is None or p[0] != lead_prefix or p[1] != src_layer:
                    continue
                rest = p[2]
                inputs = tuple(f"{sources[s.model].main_layer_prefix()}{s.start + o}.{rest}" for s in slc.sources)
                slots.append(OutputSlot(f"{prefix}{k}.{rest}", k, _position(o, slc.length), slc, inputs))
            k += 1
    slots += [OutputSlot(n, None, 0.0, last, (n,) * len(last.sources)) for n in outer if not before_layers(n)]
    return Layout(tuple(slots), k)


# Buffers some checkpoints carry that no model loads (transformers drops them): never worth a complaint.
_IGNORED_ENDINGS = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


def first_rule(rules: Sequence[Rule], name: str) -> tuple[int, Rule] | None:
    """The first of the recipe's ``rules`` that matches ``name``, with its index."""
    return next(((i, r) for i, r in enumerate(rules) if name_matches(r.match, name)), None)


def complete(
    layout: Layout, recipe: Recipe, sources: Mapping[str, ModelSource], reference: ModelSource, problems: Problems
) -> tuple[Layout, list[str]]:
    """The layout as the rules shape it, and with nothing silently lost: tensors a ``drop: true`` rule matches
    leave it; a tensor that merged models have but the output would lack (the output follows ``reference``)
    joins it when a ``take`` rule names it, and is otherwise a problem that names the tensor, the models that
    have it and the two rules that resolve it. Also returns warnings for what is left out knowingly."""
    rules = recipe.rules or ()
    slots = [s for s in layout.slots if not ((r := first_rule(rules, s.name)) and r[1].drop)]
    notes: list[str] = []
    tied = reference.tied_embeddings
    for name, models in _left_out(layout, sources).items():
        rule = first_rule(rules, name)
        if rule is not None and rule[1].drop:
            continue
        if rule is not None and rule[1].take is not None:
            parts = split_layer(name)
            slc = layout.slots[0].slice if layout.slots else None
            if slc is not None:
                slots.append(OutputSlot(name, parts[1] if parts else None, 0.0, slc, (name,) * len(slc.sources)))
            continue
        have = ", ".join(repr(m) for m in models)
        if name.endswith(_IGNORED_ENDINGS):
            continue  # a buffer that transformers drops when it loads a model
        if role_of(name) is Role.HEAD and tied:
            notes.append(
                f"{name!r} of {have} is not in the output: it follows {reference.ref!r}, whose config ties the "
                "output head to the token embedding"
            )
            continue
        problems.add(
            f"{name!r} is in {have} but not in {reference.ref!r}, which the output follows, so the output would lack "
            f"it: add `rules: [{{match: {name!r}, take: {models[0]!r}}}]` to take it from a model that has it, or "
            f"`[{{match: {name!r}, drop: true}}]` to leave it out",
            group="left out",
        )
    return Layout(tuple(slots), layout.layers), notes


def _left_out(layout: Layout, sources: Mapping[str, ModelSource]) -> dict[str, list[str]]:
    """Tensors of the merged models that the output lacks, by name, with the models that have them: outside the
    layers, names the output does not have; in the layers, tensors of a layer the output takes that no output
    tensor reads (layers a ``slices:`` recipe does not take are left out on purpose)."""
    out_names = {slot.name for slot in layout.slots}
    read: dict[str, set[str]] = {}
    chosen: dict[str, set[int]] = {}  # the layers each model contributes
    for slot in layout.slots:
        for src, name in zip(slot.slice.sources, slot.inputs):
            info = lookup_tensor(sources[src.model], name)
            read.setdefault(src.model, set()).add(info.name if info is not None else name)
            if (parts := split_layer(name)) is not None:
                chosen.setdefault(src.model, set()).add(parts[1])
    out: dict[str, list[str]] = {}
    for model, names in read.items():
        src = sources[model]
        prefix = src.main_layer_prefix()
        for name in src.tensors:
            parts = split_layer(name)
            if parts is not None and parts[0] == prefix:
                lost = parts[1] in chosen.get(model, set()) and name not in names
            else:
                lost = name not in out_names and name not in names
            if lost:
                out.setdefault(name, []).append(model)
    return out
