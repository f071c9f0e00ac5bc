"""Stage 2 — which output tensors there are and which input tensors feed each.

A ``models:`` recipe is one slice over whole models (as mergekit normalises it): the output has the
reference model's tensors, in its order and with its names. A ``slices:`` recipe stacks layer ranges:
output layer k of slice s reads layer ``start + o`` of each source, renumbered into the reference model's
layer prefix; tensors outside the layers come from the first slice (embeddings) and the last (the rest).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from mergekitlite.methods import MethodSpec
from mergekitlite.plan.inputs import lookup_tensor
from mergekitlite.plan.problems import Problems
from mergekitlite.recipe import InputModel, OutputSlice, Parameters, Recipe, Rule
from mergekitlite.roles import MODULE_PREFIXES, Role, before_layers, module_of, role_of, split_layer
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
    whole: bool = False  # over whole models (a models: list): the output follows the reference's names and order
    module: str | None = None  # the part of a multimodal model it covers (``modules:``)
    module_params: Parameters | None = None


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
    module_layers: Mapping[str, int] = field(default_factory=dict)  # the same per restacked module


@dataclass(frozen=True)
class _Part:
    """The models or slices of the whole recipe, or of one of its ``modules:``."""

    where: str  # how messages name it: "" or "modules.NAME."
    models: Sequence[InputModel] | None
    slices: Sequence[OutputSlice] | None
    module: str | None = None
    params: Parameters | None = None


def _parts(recipe: Recipe) -> list[_Part]:
    if recipe.modules:
        return [_Part(f"modules.{name}.", m.models, m.slices, name, m.parameters) for name, m in recipe.modules.items()]
    return [_Part("", recipe.models, recipe.slices)]


def in_module(name: str, module: str | None, modules: Sequence[str]) -> bool:
    """Whether a tensor belongs to ``module`` (None: the whole model) among the recipe's ``modules``."""
    return module is None or module_of(name, modules) == module


def layer_stack(src: ModelSource, module: str | None = None, modules: Sequence[str] = ()) -> tuple[str | None, int]:
    """(prefix, layers) of the model's layer stack (within ``module``): the prefix with the most layers."""
    if module is None:
        prefix = src.main_layer_prefix()
        return prefix, src.layer_counts[prefix] if prefix is not None else 0
    counts: dict[str, int] = {}
    for name in src.tensors:
        if (parts := split_layer(name)) is not None and in_module(name, module, modules):
            counts[parts[0]] = max(counts.get(parts[0], 0), parts[1] + 1)
    if not counts:
        return None, 0
    prefix = max(counts, key=lambda p: (counts[p], -len(p)))
    return prefix, counts[prefix]


def layer_count(src: ModelSource) -> int:
    return layer_stack(src)[1]


def normalize(recipe: Recipe, spec: MethodSpec, sources: Mapping[str, ModelSource]) -> list[Slice]:
    """The recipe as slices: a ``models:`` list is one slice over whole models (per module, for a ``modules:``
    recipe). The base model joins every slice's sources when the method uses one and the recipe does not
    list it. Raises PlanError."""
    problems = Problems()
    modules = list(recipe.modules or ())
    for name in modules:
        if name not in MODULE_PREFIXES:
            problems.add(f"modules.{name}: not a module mergekitlite knows; known: {', '.join(MODULE_PREFIXES)}")
    problems.raise_if_any()
    out: list[Slice] = []
    for part in _parts(recipe):
        if part.slices:
            made = [_layer_slice(recipe, part, spec, sources, i, modules, problems) for i in range(len(part.slices))]
            out += [s for s in made if s is not None]
        else:
            out.append(_whole_models(recipe, part, spec, sources, modules, problems))
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
    recipe: Recipe,
    part: _Part,
    spec: MethodSpec,
    sources: Mapping[str, ModelSource],
    i: int,
    modules: Sequence[str],
    problems: Problems,
) -> Slice | None:
    s = part.slices[i]  # type: ignore[index]
    lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
    if len(lengths) != 1:
        problems.add(
            f"{part.where}slices[{i}]: every source must span the same number of layers, got {sorted(lengths)}"
        )
        return None
    for j, src in enumerate(s.sources):
        have = layer_stack(sources[src.model], part.module, modules)[1]
        if src.layer_range[1] > have:
            problems.add(
                f"{part.where}slices[{i}].sources[{j}].layer_range: {list(src.layer_range)} is past the end of "
                f"{src.model!r}, which has {have} layers"
            )
    base = s.base_model or recipe.base_model
    srcs = tuple(SliceSource(src.model, src.layer_range[0], src.parameters) for src in s.sources)
    return Slice(
        _with_base(spec, base, srcs, s.sources[0].layer_range[0]),
        lengths.pop(),
        base,
        s.parameters,
        module=part.module,
        module_params=part.params,
    )


def _whole_models(
    recipe: Recipe,
    part: _Part,
    spec: MethodSpec,
    sources: Mapping[str, ModelSource],
    modules: Sequence[str],
    problems: Problems,
) -> Slice:
    assert part.models is not None
    srcs = _with_base(spec, recipe.base_model, tuple(SliceSource(m.model, 0, m.parameters) for m in part.models), 0)
    counts = {src.model: layer_stack(sources[src.model], part.module, modules)[1] for src in srcs}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{m!r} has {n}" for m, n in counts.items())
        problems.add(
            f"{part.where or 'the '}models have different numbers of layers ({listing}); use 'slices' to choose layers"
        )
    length = max(counts.values(), default=0)
    return Slice(srcs, length, recipe.base_model, None, whole=True, module=part.module, module_params=part.params)


def reference_model(recipe: Recipe, slices: Sequence[Slice]) -> str:
    """The model the output follows in tensor names, order and dtypes: the base, else the first model."""
    return recipe.base_model or slices[0].sources[0].model


def _position(index: int, count: int) -> float:
    """t of layer ``index`` of ``count`` (mergekit: i/(n−1); a single layer is at 1)."""
    return index / (count - 1) if count > 1 else 1.0


def enumerate_outputs(
    recipe: Recipe, slices: Sequence[Slice], sources: Mapping[str, ModelSource], reference: ModelSource
) -> Layout:
    """Every output tensor, in output order, with the input tensor names that feed it: module by module for a
    ``modules:`` recipe."""
    modules = list(recipe.modules or ())
    groups: dict[str | None, list[Slice]] = {}
    for slc in slices:
        groups.setdefault(slc.module, []).append(slc)
    slots: list[OutputSlot] = []
    layers: int | None = None
    module_layers: dict[str, int] = {}
    for module, group in groups.items():
        if group[0].whole:
            slots += _whole_model_slots(group[0], reference, modules)
            continue
        made, count = _restacked(group, sources, reference, modules)
        slots += made
        if module is None:
            layers = count
        else:
            module_layers[module] = count
    return Layout(tuple(slots), layers, module_layers)


def _whole_model_slots(slc: Slice, reference: ModelSource, modules: Sequence[str]) -> list[OutputSlot]:
    slots = []
    for name in reference.tensors:
        if not in_module(name, slc.module, modules):
            continue
        parts = split_layer(name)
        layer, t = (None, 0.0) if parts is None else (parts[1], _position(parts[1], reference.layer_counts[parts[0]]))
        slots.append(OutputSlot(name, layer, t, slc, (name,) * len(slc.sources)))
    return slots


def _restacked(
    slices: Sequence[Slice], sources: Mapping[str, ModelSource], reference: ModelSource, modules: Sequence[str]
) -> tuple[list[OutputSlot], int]:
    module = slices[0].module
    prefix = layer_stack(reference, module, modules)[0]
    mine = [n for n in reference.tensors if in_module(n, module, modules)]
    outer = [n for n in mine if not ((p := split_layer(n)) is not None and p[0] == prefix)]
    first, last = slices[0], slices[-1]
    slots = [OutputSlot(n, None, 0.0, first, (n,) * len(first.sources)) for n in outer if before_layers(n)]
    k = 0
    for slc in slices:
        lead = sources[slc.sources[0].model]
        lead_prefix = layer_stack(lead, module, modules)[0] or ""
        stacks = [layer_stack(sources[s.model], module, modules)[0] for s in slc.sources]
        for o in range(slc.length):
            src_layer = slc.sources[0].start + o
            for n in lead.tensors:
                p = split_layer(n)
                if p is None or p[0] != lead_prefix or p[1] != src_layer:
                    continue
                rest = p[2]
                inputs = tuple(f"{stack}{s.start + o}.{rest}" for stack, s in zip(stacks, slc.sources))
                slots.append(OutputSlot(f"{prefix}{k}.{rest}", k, _position(o, slc.length), slc, inputs))
            k += 1
    slots += [OutputSlot(n, None, 0.0, last, (n,) * len(last.sources)) for n in outer if not before_layers(n)]
    return slots, k


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
        if recipe.modules and module_of(name, list(recipe.modules)) is None:
            problems.add(
                f"{name!r} belongs to none of the recipe's modules ({', '.join(recipe.modules)}): add the module it "
                f"belongs to, or `rules: [{{match: {name!r}, take: {models[0]!r}}}]` / `drop: true`",
                group="left out",
            )
            continue
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
    return replace(layout, slots=tuple(slots)), notes


def _left_out(layout: Layout, sources: Mapping[str, ModelSource]) -> dict[str, list[str]]:
    """Tensors of the merged models that the output lacks, by name, with the models that have them: outside the
    layers, names the output does not have; in a layer stack the output takes layers of, tensors of a layer it
    takes that no output tensor reads (layers a ``slices:`` recipe does not take are left out on purpose)."""
    out_names = {slot.name for slot in layout.slots}
    read: dict[str, set[str]] = {}
    chosen: dict[tuple[str, str], set[int]] = {}  # (model, layer prefix) → the layers it contributes
    for slot in layout.slots:
        for src, name in zip(slot.slice.sources, slot.inputs):
            info = lookup_tensor(sources[src.model], name)
            read.setdefault(src.model, set()).add(info.name if info is not None else name)
            if (parts := split_layer(name)) is not None:
                chosen.setdefault((src.model, parts[0]), set()).add(parts[1])
    out: dict[str, list[str]] = {}
    for model, names in read.items():
        for name in sources[model].tensors:
            parts = split_layer(name)
            if parts is not None and (model, parts[0]) in chosen:
                lost = parts[1] in chosen[(model, parts[0])] and name not in names
            else:
                lost = name not in out_names and name not in names
            if lost:
                out.setdefault(name, []).append(model)
    return out
