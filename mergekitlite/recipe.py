"""The recipe: mergekit's YAML format (plus a few additive keys), validated by Pydantic.

Loading collects *every* problem — schema errors from Pydantic and consistency checks that need
no model files — and raises one ``RecipeError`` whose lines read
``recipes/x.yaml:7:5: dtype: unknown dtype 'bfloat17'; expected one of float32, ...``.

What mergekit *ignores* is a warning, not an error: its Pydantic models ignore unknown keys, its
methods read only the parameters they declare, and YAML keeps the later of two equal keys. A
published config with such a key gives the same model here as in mergekit, and the warning says
where the key is, what was probably meant and what mergekit does with it
(``recipes/x.yaml:7:5: models[1].paramters: unknown key (did you mean 'parameters'?); mergekit
ignores this key: no parameters are set here``). ``strict=True`` makes every warning an error.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    field_validator,
)

from mergekitlite.errors import RecipeError, UnknownMethodError
from mergekitlite.lora.reference import adapter_parts
from mergekitlite.methods import REGISTRY, Param, Range
from mergekitlite.tokens import builtin_chat_template, builtin_chat_templates
from mergekitlite.yamlpos import PositionedYaml, YamlSyntaxError, load_positioned_all

SCHEMA_URL_COMMENT = "# yaml-language-server: $schema=../schemas/recipe.schema.json"

DTYPES = ("float32", "bfloat16", "float16", "float64")
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp64": "float64",
    "double": "float64",
}


def normalize_dtype(value: str) -> str:
    name = value.removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; expected one of {', '.join(DTYPES)}")
    return name


DType = Annotated[str, Field(json_schema_extra={"enum": [*DTYPES, *_DTYPE_ALIASES]})]


class Strict(BaseModel):
    # Unknown keys are refused here, so that the JSON schema refuses them (editors, --strict); the
    # loader then drops those that mergekit ignores, with a warning (_validate_schema).
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- parameter settings
Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr]
Gradient = Annotated[list[StrictInt | StrictFloat], Field(min_length=1)]


class ConditionalParameter(Strict):
    """One rule of a filtered parameter: applies to tensors whose name matches ``filter``."""

    filter: str | None = Field(
        None,
        description="Which tensors this value is for. A plain string matches as a substring of the "
        "tensor name (mergekit's rule), a pattern with * ? [ ] as a glob over the whole name, "
        "'re:...' as a regular expression (searched). Omitted or '*': every tensor.",
    )
    value: Scalar | Gradient


def _setting_kind(value: Any) -> str | None:
    if isinstance(value, (bool, int, float, str)):
        return "scalar"
    if isinstance(value, dict):
        return "rule"
    if isinstance(value, list) and value:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return "gradient"
        if all(isinstance(v, dict) for v in value):
            return "rules"
    return None


ParameterSetting = Annotated[
    Annotated[Scalar, Tag("scalar")]
    | Annotated[Gradient, Tag("gradient")]
    | Annotated[ConditionalParameter, Tag("rule")]
    | Annotated[list[ConditionalParameter], Tag("rules")],
    Discriminator(
        _setting_kind,
        custom_error_type="parameter_setting",
        custom_error_message="expected a number, a list of numbers (a gradient over the layers), "
        "or a list of {filter, value} rules",
        custom_error_context={"discriminator": "kind"},
    ),
]
_SETTING_TAGS = {"scalar", "gradient", "rule", "rules"}

Parameters = dict[str, ParameterSetting]


# ---------------------------------------------------------------- model references
def _check_model_ref(value: str) -> str:
    if not value.strip():
        raise ValueError("empty model reference")
    adapter_parts(value)  # model+adapter: one '+' between two names (raises ValueError otherwise)
    return value


ModelName = Annotated[
    str,
    Field(
        description="Local folder or Hugging Face hub id (optionally id@revision); `model+adapter` applies a PEFT "
        "LoRA adapter (a folder or hub id) to the model while merging."
    ),
]


class InputModel(Strict):
    model: ModelName
    parameters: Parameters | None = None

    _v = field_validator("model")(_check_model_ref)


class InputSlice(Strict):
    model: ModelName
    layer_range: tuple[int, int] = Field(description="[start, end): layers taken from this model")
    parameters: Parameters | None = None

    _v = field_validator("model")(_check_model_ref)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"expected [start, end) with 0 <= start < end, got {list(v)}")
        return v


class OutputSlice(Strict):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: ModelName | None = None
    # Accepted as in mergekit, whose planner never reads it either.
    residual_weight: Annotated[float, Field(allow_inf_nan=False)] | None = None
    parameters: Parameters | None = None


class TokenSource(Strict):
    """Where one token's embedding and lm_head rows come from (mergekit's format, plus 'merge')."""

    kind: Literal["zero", "model_token", "merge"] = Field(
        "model_token",
        description="zero: a zero row; model_token: the row of `token`/`token_id` (default: the same token) in "
        "`model`; merge (mergekitlite): merged like every other row.",
    )
    model: ModelName | None = None
    token: str | None = None
    token_id: int | None = None


class TokenSpec(Strict):
    source: ModelName | TokenSource | None = Field(
        None, description="A model to take this token's rows from, or {kind: zero|model_token|merge, ...}."
    )
    force: bool = Field(False, description="Accepted for mergekit compatibility; rows are always set as asked.")


class TokenizerConfig(Strict):
    source: ModelName = Field(
        "union",
        description="The output's vocabulary: 'union' (default, as in mergekit: every model's tokens), 'base', or "
        "a model. Embedding and lm_head rows are then found by token text in every input.",
    )
    tokens: dict[str | int, TokenSpec] | None = Field(
        None,
        description="Per-token default rows for models that lack the token (all models with force: true), keyed "
        "by token text (added to the vocabulary when new) or, mergekitlite, by output id (an unquoted number).",
    )
    pad_to_multiple_of: int | None = Field(
        None, ge=1, description="Pad the vocabulary to a multiple of this many rows (padding rows: each input's mean)."
    )
    special_tokens: Literal["merge", "take", "zero"] = Field(
        "merge",
        description="mergekitlite: rows of every special token of the tokenizer source: merge (default), take them "
        "unchanged from the tokenizer source (protects e.g. <|im_end|> in a chat-vector merge), or zero them.",
    )
    vocab_policy: Literal["keep", "mean", "zero"] | None = Field(
        None,
        description="mergekitlite: match rows by position instead of by token text; rows that exist in some "
        "inputs only (different vocabulary sizes) are kept from the tokenizer source (else the first model that "
        "has them), the mean of the models that have them, or zero, after the merge.",
    )


class Rule(Strict):
    """A mergekitlite extension: override how the tensors matching ``match`` are merged."""

    match: str = Field(
        description="Tensor names, matched like parameter filters: substring, glob (e.g. '*embed_tokens*'), "
        "or 're:<regex>'."
    )
    take: ModelName | None = Field(
        None,
        description="Copy these tensors unchanged from this model (also tensors the output would otherwise lack).",
    )
    method: str | None = Field(None, description="Merge these tensors with another method.")
    drop: bool = Field(False, description="Leave these tensors out of the output.")
    parameters: Parameters | None = Field(None, description="Parameters for these tensors (over the global ones).")


class OutputModule(Strict):
    """One part of a multimodal model (mergekit's ``modules:``): its own models or slices and parameters."""

    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None


ComputeDType = Literal["float32", "float64", "bfloat16", "float16"]


class Recipe(Strict):
    """A merge recipe. Every mergekit ``mergekit_config.yml`` key is accepted; keys marked
    'mergekitlite' are our additions."""

    merge_method: str = Field(description="Merge method name, e.g. task_arithmetic, linear, ties, slerp.")
    base_model: ModelName | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = Field(
        None,
        description="Per part of a multimodal model (text_decoder, vision_tower, multi_modal_projector, ...; "
        "encoder/decoder), its own models or slices and parameters, as in mergekit.",
    )
    parameters: Parameters | None = None
    dtype: DType | None = Field(
        None, description="Dtype of the output unless out_dtype is set (mergekit: also the compute dtype)."
    )
    out_dtype: DType | None = None
    tokenizer_source: ModelName | None = Field(
        None,
        description="Model whose tokenizer, chat template and generation config the output gets: 'base' "
        "(the default, as in mergekit), a model, or 'union' (every model's tokens; the rest from the base).",
    )
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = Field(
        None,
        description="'auto' (the inputs' most common template), a built-in template name (alpaca, chatml, exaone, "
        "llama3, mistral), or a Jinja template.",
    )
    # -- mergekitlite additions (all optional) --
    name: str | None = Field(
        None,
        description="Name of this merge step: later steps of a multi-step recipe (documents separated by ---) "
        "use it as a model, as in mergekit-multi. Also the model card's title.",
    )
    output: str | None = Field(
        None, description="mergekitlite: default output folder (relative to the working directory)."
    )
    compute_dtype: ComputeDType = Field(
        "float32", description="mergekitlite: dtype the arithmetic runs in; inputs are upcast, the result cast once."
    )
    random_seed: int | None = Field(None, description="mergekitlite: seed for random methods (DARE).")
    trust_remote_code: bool = Field(
        False, description="mergekitlite: only used by eval; merging never runs model code."
    )
    rules: list[Rule] | None = Field(None, description="mergekitlite: per-tensor overrides, first match wins.")

    _vb = field_validator("base_model")(lambda v: v if v is None else _check_model_ref(v))

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        return None if v is None else normalize_dtype(v)

    @property
    def out_dtype_name(self) -> str | None:
        return self.out_dtype or self.dtype

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, each once, in order of appearance."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        parts = [(self.models, self.slices)] + [(m.models, m.slices) for m in (self.modules or {}).values()]
        for models, slices in parts:
            for m in models or ():
                seen[m.model] = None
            for s in slices or ():
                if s.base_model:
                    seen[s.base_model] = None
                for src in s.sources:
                    seen[src.model] = None
        for r in self.rules or ():
            if r.take:
                seen[r.take] = None
        for spec in (self.tokenizer.tokens or {}).values() if self.tokenizer else ():
            src = spec.source
            model = src if isinstance(src, str) else src.model if src is not None else None
            if model:
                seen[model] = None
        return list(seen)


# ---------------------------------------------------------------- loading
class LoadedRecipe(BaseModel):
    """A validated recipe together with the text and file it came from (the model card quotes it)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)
    recipe: Recipe
    text: str  # this step's YAML document
    file_text: str = ""  # the whole file (all steps)
    path: Path | None
    warnings: tuple[str, ...] = ()
    positions: PositionedYaml | None = None

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()


def format_path(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


Where = tuple[str | int, ...]


class PositionedProblems:
    """Collects (path, message) pairs and renders them as ``file:line:col: path: message`` lines."""

    def __init__(self, source: str, pos: PositionedYaml):
        self.source = source
        self.pos = pos
        self.items: list[tuple[tuple[int, int], str]] = []
        self.paths: set[Where] = set()

    def add(self, path: Where, message: str, *, key: bool = False) -> None:
        mark = self.pos.locate(path, prefer_key=key)
        where = f"{self.source}:{mark.line}:{mark.column}" if mark else self.source
        self.items.append(((mark.line, mark.column) if mark else (0, 0), f"{where}: {format_path(path)}: {message}"))
        self.paths.add(path)

    def lines(self) -> list[str]:
        return [line for _pos, line in sorted(self.items, key=lambda item: item[0])]


# Which model validates the mapping under a field: (model, field) -> (child model, whether the
# field is a mapping of arbitrary names to children rather than a child or a list of them).
_CHILDREN: dict[tuple[type[BaseModel], str], tuple[type[BaseModel], bool]] = {
    (Recipe, "models"): (InputModel, False),
    (Recipe, "slices"): (OutputSlice, False),
    (OutputSlice, "sources"): (InputSlice, False),
    (Recipe, "tokenizer"): (TokenizerConfig, False),
    (TokenizerConfig, "tokens"): (TokenSpec, True),
    (TokenSpec, "source"): (TokenSource, False),
    (Recipe, "rules"): (Rule, False),
    (Recipe, "modules"): (OutputModule, True),
    (OutputModule, "models"): (InputModel, False),
    (OutputModule, "slices"): (OutputSlice, False),
    **{
        (m, "parameters"): (ConditionalParameter, True)
        for m in (Recipe, InputModel, InputSlice, OutputSlice, OutputModule, Rule)
    },
}

# Keys mergekit reads that mergekitlite does not implement: ignoring them would give another model.
_UNSUPPORTED: dict[tuple[type[BaseModel], str], str] = {}

# Parts of Pydantic error locations that name a union member, not a key of the user's file.
_TYPE_TAGS = _SETTING_TAGS | {"str", "int", "float", "bool", "TokenSource"}


def _model_for_path(path: Where) -> type[BaseModel] | None:
    """Which Pydantic model validates the mapping at ``path`` (None: not a model's mapping)."""
    model: type[BaseModel] = Recipe
    named_entry = False
    for part in path:
        if named_entry:  # a parameter name or token
            named_entry = False
        elif isinstance(part, int):  # a list entry
            continue
        elif (child := _CHILDREN.get((model, part))) is None:
            return None
        else:
            model, named_entry = child
    return model


def _data_path(data: Any, loc: tuple[Any, ...]) -> Where:
    """A Pydantic error location as a path in the user's data: union member tags ('rules',
    'TokenSource', 'str') dropped; a missing key (the last part) kept."""
    path: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        ):
            path.append(part)
            node = node[part]
        elif i == len(loc) - 1 and isinstance(node, dict) and part not in _TYPE_TAGS:
            path.append(part)
    return tuple(path)


def _mapping_at(data: Any, path: Where) -> dict[Any, Any]:
    node = data
    for part in path:
        node = node[part]
    assert isinstance(node, dict)
    return node


def closest(word: str, known: Iterable[str]) -> str | None:
    """The known name ``word`` most likely misspells: two letters swapped first (``modles`` is ``models``, not
    ``modules``), else the closest by difflib."""
    close = difflib.get_close_matches(word, list(known), n=3)
    swapped = [c for c in close if sorted(c) == sorted(word)]
    return (swapped or close or [None])[0]


def _ignored_key_message(data: dict[str, Any], path: Where, model: type[BaseModel]) -> str:
    """The warning for a key that mergekit's ``model`` ignores: where it probably belongs, and
    what mergekit makes of the mapping without it (which is what mergekitlite makes of it too)."""
    key = str(path[-1])
    mapping = _mapping_at(data, path[:-1])
    known = list(model.model_fields)
    meant = closest(key, known)
    misplaced_parameter = not meant and key in REGISTRY.all_param_names() and "parameters" in known
    if meant:
        hint = f" (did you mean {meant!r}?)"
    elif misplaced_parameter:
        hint = f" ({key!r} is a merge parameter: it takes effect under 'parameters:')"
    else:
        hint = f"; expected one of: {', '.join(known)}"
    if misplaced_parameter:
        effect = ": it sets no parameter"
    elif model is ConditionalParameter and "filter" not in mapping:
        effect = ": this rule has no filter, so it applies to every tensor"
    elif meant in ("tokenizer_source", "tokenizer") and not {"tokenizer_source", "tokenizer"} & set(mapping):
        effect = ": the tokenizer comes from the base model"
    elif meant == "parameters" and "parameters" not in mapping:
        effect = ": no parameters are set here"
    elif meant and meant not in mapping and model.model_fields[meant].is_required():
        effect = f", and {meant!r} is required"
    else:
        effect = ""
    return f"unknown key{hint}; mergekit ignores this key{effect}"


def _pydantic_problems(errors: list[Any], data: Any, problems: PositionedProblems, skip: set[Where]) -> None:
    for err in errors:
        loc = _data_path(data, err["loc"])
        if any(loc[: len(s)] == s for s in skip):
            continue  # already reported (a non-finite number)
        kind = err["type"]
        if kind == "extra_forbidden":  # left after the ignored keys were dropped: a key mergekit uses
            problems.add(loc, _UNSUPPORTED.get((_model_for_path(loc[:-1]), loc[-1]), "unknown key"), key=True)
        elif kind == "missing":
            problems.add(loc, "required key is missing")
        elif kind == "parameter_setting":
            problems.add(loc, f"{err['msg']}; got {err['input']!r}")
        else:
            got = err.get("input")
            msg = err["msg"].removeprefix("Value error, ")
            shown = f"; got {got!r}" if not isinstance(got, (dict, list)) and repr(got) not in msg else ""
            problems.add(loc, f"{msg[0].lower()}{msg[1:]}{shown}")


def _validate_schema(data: dict[str, Any], warnings: PositionedProblems) -> tuple[Recipe | None, list[Any]]:
    """Pydantic validation, mergekit's way: a key that its model of that mapping ignores is
    dropped (with a warning) and the rest validated again, so the recipe means what it means to
    mergekit. Returns the recipe, or the Pydantic errors left."""
    while True:
        try:
            return Recipe.model_validate(data), []
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        dropped = False
        for err in errors:
            if err["type"] != "extra_forbidden":
                continue
            loc = _data_path(data, err["loc"])
            model = _model_for_path(loc[:-1])
            if model is None or (model, loc[-1]) in _UNSUPPORTED:
                continue
            warnings.add(loc, _ignored_key_message(data, loc, model), key=True)
            del _mapping_at(data, loc[:-1])[loc[-1]]
            dropped = True
        if not dropped:
            return None, errors


def _raw_param_locations(data: dict[str, Any]) -> Iterable[tuple[tuple[str | int, ...], dict[str, Any]]]:
    """Every ``parameters`` mapping in the raw data, so that name checks run even when other
    parts of the recipe failed validation."""

    def params_at(node: Any, where: tuple[str | int, ...]) -> Iterable[tuple[tuple[str | int, ...], dict[str, Any]]]:
        if isinstance(node, dict) and isinstance(node.get("parameters"), dict):
            yield (*where, "parameters"), node["parameters"]

    def inputs_at(node: dict[str, Any], where: Where) -> Iterable[tuple[tuple[str | int, ...], dict[str, Any]]]:
        yield from params_at(node, where)
        for key in ("models", "rules"):
            for i, m in enumerate(node.get(key) or () if isinstance(node.get(key), list) else ()):
                yield from params_at(m, (*where, key, i))
        slices = node.get("slices")
        for i, s in enumerate(slices if isinstance(slices, list) else ()):
            yield from params_at(s, (*where, "slices", i))
            sources = s.get("sources") if isinstance(s, dict) else None
            for j, src in enumerate(sources if isinstance(sources, list) else ()):
                yield from params_at(src, (*where, "slices", i, "sources", j))

    yield from inputs_at(data, ())
    modules = data.get("modules")
    for name, module in modules.items() if isinstance(modules, dict) else ():
        if isinstance(module, dict):
            yield from inputs_at(module, ("modules", name))


def _check_filters(setting: Any, where: tuple[str | int, ...], problems: PositionedProblems) -> None:
    rules = [setting] if isinstance(setting, dict) else setting if isinstance(setting, list) else []
    for k, rule in enumerate(rules):
        f = rule.get("filter") if isinstance(rule, dict) else None
        if isinstance(f, str) and f.startswith("re:"):
            try:
                re.compile(f[3:])
            except re.error as exc:
                path = (*where, "filter") if isinstance(setting, dict) else (*where, k, "filter")
                problems.add(path, f"invalid regular expression: {exc}")


_NUMBER_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _numeric_strings_to_floats(setting: Any) -> Any:
    """YAML 1.1 reads ``5e-1`` (no dot) as a string; mergekit's float fields accept it, so do we."""
    if isinstance(setting, str) and _NUMBER_RE.match(setting.strip()):
        return float(setting)
    if isinstance(setting, list):
        return [_numeric_strings_to_floats(v) for v in setting]
    if isinstance(setting, dict) and "value" in setting:
        return {**setting, "value": _numeric_strings_to_floats(setting["value"])}
    return setting


def _normalize_numbers(data: dict[str, Any]) -> None:
    for _where, params in _raw_param_locations(data):
        for name in list(params):
            params[name] = _numeric_strings_to_floats(params[name])
    for s in data.get("slices") or () if isinstance(data.get("slices"), list) else ():
        if isinstance(s, dict) and "residual_weight" in s:  # mergekit's only other float field
            s["residual_weight"] = _numeric_strings_to_floats(s["residual_weight"])


def _check_values(setting: Any, where: tuple[str | int, ...], param: Param, problems: PositionedProblems) -> None:
    """Every value a setting can take (the scalar, each gradient point, each rule's value) must be of the
    parameter's kind (number, or true/false — 0 and 1 included, as mergekit's float-typed configs write
    them) and in its range (``Param.check``); each problem points at the value."""
    if isinstance(setting, dict):
        if "value" in setting:
            _check_values(setting["value"], (*where, "value"), param, problems)
        return
    if isinstance(setting, list):
        for i, item in enumerate(setting):
            _check_values(item, (*where, i), param, problems)
        return
    if isinstance(setting, float) and not math.isfinite(setting):
        return  # reported once, with the recipe's own spelling, by the non-finite check
    if (problem := param.check(setting)) is not None:
        problems.add(where, problem)


def _raw_checks(data: dict[str, Any], problems: PositionedProblems, warnings: PositionedProblems) -> None:
    """Method name and parameter names, checked on the raw mapping."""
    method = data.get("merge_method")
    if not isinstance(method, str):
        return
    try:
        spec = REGISTRY.get(method)
    except UnknownMethodError as exc:
        problems.add(("merge_method",), exc.problems[0])
        return
    # Parameters the method does not take are warnings: mergekit's planner reads only the names a
    # method declares (plan.py: `for p in tensor_merge_method.parameters()`) and ignores the rest,
    # typos included, and published configs often carry e.g. int8_mask or density whatever the method.
    known_everywhere = REGISTRY.all_param_names()
    rule_methods = (
        {i: r.get("method") for i, r in enumerate(data.get("rules") or ()) if isinstance(r, dict)}
        if isinstance(data.get("rules"), list)
        else {}
    )
    for where, params in _raw_param_locations(data):
        mine_spec = spec
        if where[:1] == ("rules",) and isinstance(rule_methods.get(where[1]), str):
            try:
                mine_spec = REGISTRY.get(rule_methods[where[1]])
            except UnknownMethodError:
                continue
        mine = {p.name for p in mine_spec.params}
        for name, setting in params.items():
            _check_filters(setting, (*where, name), problems)
            param = mine_spec.param(str(name))
            if param is not None:
                _check_values(setting, (*where, name), param, problems)
                continue
            if name in known_everywhere:
                warnings.add((*where, name), f"{mine_spec.name} does not use '{name}'; mergekit ignores it", key=True)
                continue
            close = closest(str(name), sorted(known_everywhere))
            hint = f" (did you mean {close!r}?)" if close else ""
            expected = ", ".join(sorted(mine)) or "none"
            warnings.add(
                (*where, name),
                f"unknown parameter for {mine_spec.name}{hint}; it takes: {expected}; mergekit ignores it",
                key=True,
            )


def _yaml_float(value: float) -> str:
    return ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"


def _check_finite(data: Any, problems: PositionedProblems) -> set[Where]:
    """Every number must be finite: a .nan or .inf weight (or 1e400, which is infinite) would
    give a model of NaNs without a word. Returns where they are, so that schema errors about the
    same values are not reported twice."""
    found: set[Where] = set()

    def walk(node: Any, path: Where) -> None:  # the YAML loader bounds the depth
        if isinstance(node, float) and not math.isfinite(node):
            hint = " (numbers beyond ±1.8e308 are infinite)" if math.isinf(node) else ""
            problems.add(path, f"expected a finite number, got {_yaml_float(node)}{hint}")
            found.add(path)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(data, ())
    return found


def _inputs(recipe: Recipe) -> Iterable[tuple[Where, str, tuple[Parameters | None, ...], str | None]]:
    """Every input model with where it is written, its parameter levels (most specific first)
    and the base model it is merged against."""
    parts: list[tuple[Where, OutputModule | Recipe]] = [((), recipe)]
    parts += [(("modules", name), module) for name, module in (recipe.modules or {}).items()]
    for where, part in parts:
        module_params = (part.parameters,) if isinstance(part, OutputModule) else ()
        for i, m in enumerate(part.models or ()):
            yield (*where, "models", i), m.model, (m.parameters, *module_params), recipe.base_model
        for i, s in enumerate(part.slices or ()):
            for j, src in enumerate(s.sources):
                yield (
                    (*where, "slices", i, "sources", j),
                    src.model,
                    (src.parameters, s.parameters, *module_params),
                    s.base_model or recipe.base_model,
                )


def _semantic_checks(recipe: Recipe, problems: PositionedProblems) -> None:
    """Consistency checks on a schema-valid recipe that need the registry but no model files."""
    try:
        spec = REGISTRY.get(recipe.merge_method)
    except UnknownMethodError:
        return  # reported by _raw_checks

    given = [k for k in ("models", "slices", "modules") if getattr(recipe, k) is not None]
    if len(given) > 1:
        problems.add((given[1],), f"give one of 'models', 'slices' or 'modules', not {' and '.join(given)}", key=True)
    elif not given:
        needs = "the recipe needs a 'models' list (or 'slices' or 'modules') naming what to merge"
        problems.add(("merge_method",), needs)
    for name, module in (recipe.modules or {}).items():
        if (module.models is None) == (module.slices is None):
            problems.add(("modules", name), "a module needs either 'models' or 'slices'")
    if recipe.models is not None and not recipe.models:
        problems.add(("models",), "empty list: name at least one model")
    if recipe.tokenizer is not None and recipe.tokenizer_source is not None:
        problems.add(("tokenizer",), "give either 'tokenizer' or 'tokenizer_source', not both")

    slices = [*(recipe.slices or ()), *(s for m in (recipe.modules or {}).values() for s in m.slices or ())]
    if spec.base == "required" and not recipe.base_model and not any(s.base_model for s in slices):
        problems.add(
            ("merge_method",),
            f"{spec.name} needs 'base_model' (the model the differences are taken from, e.g. the pretrained parent)",
        )

    # A required per-model parameter (weight, for linear, task_arithmetic, ties, ...) must be given
    # for every input but the base model, on the input, its slice or globally: mergekit declares it
    # required (ConfigParameterDef(name="weight", required=True)) and its planner stops with "Missing
    # required parameter" otherwise (plan.py: required=p.required and not is_base) - in the models:
    # form, which it turns into one slice, and in the slices: form alike. So both forms are checked
    # here, the same way, before any model is opened. Filters that leave some tensors without a
    # value are found by the planner, which knows the tensor names.
    global_names = set(recipe.parameters or {})
    for p in spec.model_params:
        if not p.required or p.name in global_names:
            continue
        for where, model, levels, base in _inputs(recipe):
            if spec.base != "unused" and model == base:
                continue
            if not any(p.name in (level or {}) for level in levels):
                problems.add((*where, "model"), f"{spec.name} needs parameters.{p.name} for this model")

    count = len([m for m in recipe.models or () if not (spec.base != "unused" and m.model == recipe.base_model)])
    if recipe.models:
        if count < spec.min_models:
            problems.add(
                ("models",), f"{spec.name} needs at least {spec.min_models} model(s) besides the base, got {count}"
            )
        if spec.max_models is not None and count > spec.max_models:
            problems.add(("models",), f"{spec.name} takes at most {spec.max_models} model(s), got {count}")

    for i, r in enumerate(recipe.rules or ()):
        if (r.take is not None) + (r.method is not None) + r.drop != 1:
            problems.add(("rules", i), "a rule needs exactly one of 'take' (a model), 'method' or 'drop: true'")
        if r.method is not None:
            try:
                REGISTRY.get(r.method)
            except UnknownMethodError as exc:
                problems.add(("rules", i, "method"), exc.problems[0])
        if r.match.startswith("re:"):
            try:
                re.compile(r.match[3:])
            except re.error as exc:
                problems.add(("rules", i, "match"), f"invalid regular expression: {exc}")

    template = recipe.chat_template
    if template is not None and template != "auto" and builtin_chat_template(template) is None and "{" not in template:
        names = ", ".join(builtin_chat_templates())
        problems.add(
            ("chat_template",),
            f"unknown chat template {template!r}; the built-in ones are {names} "
            "('auto' takes the inputs' most common template; a Jinja template is used as written)",
        )
    for key, spec_ in (recipe.tokenizer.tokens or {}).items() if recipe.tokenizer else ():
        src = spec_.source
        if isinstance(src, TokenSource) and src.kind == "model_token" and src.model is None:
            problems.add(("tokenizer", "tokens", key, "source", "model"), "kind model_token needs 'model'")


def validate_document(
    pos: PositionedYaml, text: str, source: str, path: Path | None, whole: bool, strict: bool
) -> tuple[LoadedRecipe | None, list[str]]:
    if not isinstance(pos.data, dict):
        kind = "empty" if pos.data is None else type(pos.data).__name__
        first = pos.values.get(())
        where = f"{source}:{first.line}:{first.column}" if first else source
        return None, [f"{where}: expected a mapping with merge_method, models, ...; found {kind}"]
    problems = PositionedProblems(source, pos)
    warnings = PositionedProblems(source, pos)
    for dup in pos.duplicates:
        warnings.add(
            dup.path,
            f"duplicate key (also on line {dup.earlier.line}); mergekit, as any YAML loader, "
            f"uses this later value and ignores the one on line {dup.earlier.line}",
            key=True,
        )
    _normalize_numbers(pos.data)
    recipe, errors = _validate_schema(pos.data, warnings)
    _pydantic_problems(errors, pos.data, problems, skip=_check_finite(pos.data, problems))
    _raw_checks(pos.data, problems, warnings)
    if recipe is not None:
        _semantic_checks(recipe, problems)
    if problems.items or recipe is None or (strict and warnings.items):
        # Strict: every warning is an error. Failing anyway: the warnings often say why (a
        # misspelled 'paramters' is why a model has no weight), so they are listed too.
        problems.items += warnings.items
        return None, problems.lines()
    doc_text = text[pos.span[0] : pos.span[1]] if pos.span != (0, 0) and not whole else text
    loaded = LoadedRecipe(
        recipe=recipe,
        text=doc_text if doc_text.strip() else text,
        file_text=text,
        path=path,
        warnings=tuple(warnings.lines()),
        positions=pos,
    )
    return loaded, []


def parse_recipes(
    text: str, source: str = "<recipe>", path: Path | None = None, *, strict: bool = False
) -> list[LoadedRecipe]:
    """Validate every document (merge step) of ``text``; later steps may use earlier steps'
    ``name`` as a model (mergekit-multi's format). Raises one RecipeError listing every problem;
    with ``strict``, what would be a warning (a key mergekit ignores) is a problem too."""
    try:
        docs = load_positioned_all(text)
    except YamlSyntaxError as exc:
        where = f"{source}:{exc.mark.line}:{exc.mark.column}" if exc.mark else source
        raise RecipeError([f"{where}: {exc}"]) from None
    if not docs:
        raise RecipeError([f"{source}: the file is empty; expected merge_method, models, ..."])
    steps: list[LoadedRecipe] = []
    lines: list[str] = []
    for pos in docs:
        # A single-step recipe keeps its whole text, comments included (the card quotes it).
        loaded, errs = validate_document(pos, text, source, path, whole=len(docs) == 1, strict=strict)
        lines += errs
        if loaded is not None:
            steps.append(loaded)
    if not lines and len(steps) > 1:
        lines += _check_steps(steps, source)
    if lines:
        raise RecipeError(lines)
    return steps


def path_of_model(recipe: Recipe, ref: str) -> tuple[str | int, ...]:
    """Where in the recipe ``ref`` is named first (for error positions)."""
    if recipe.base_model == ref:
        return ("base_model",)
    for i, m in enumerate(recipe.models or ()):
        if m.model == ref:
            return ("models", i, "model")
    for i, sl in enumerate(recipe.slices or ()):
        for j, src in enumerate(sl.sources):
            if src.model == ref:
                return ("slices", i, "sources", j, "model")
    for i, r in enumerate(recipe.rules or ()):
        if r.take == ref:
            return ("rules", i, "take")
    return ("tokenizer_source",) if recipe.tokenizer_source == ref else ()


def _check_steps(steps: list[LoadedRecipe], source: str) -> list[str]:
    """Cross-step rules: names unique, only the last step unnamed, no reference to a later step."""
    lines: list[str] = []

    def where(step: LoadedRecipe, key: tuple[str | int, ...]) -> str:
        mark = step.positions.locate(key) if step.positions else None
        return f"{source}:{mark.line}:{mark.column}" if mark else source

    seen: dict[str, int] = {}
    names = [s.recipe.name for s in steps]
    for i, step in enumerate(steps):
        name = step.recipe.name
        if name is None and i != len(steps) - 1:
            lines.append(
                f"{where(step, ('merge_method',))}: step {i + 1} of {len(steps)} needs a 'name' "
                "so that later steps can use its result"
            )
        if name is not None and name in seen:
            lines.append(f"{where(step, ('name',))}: name: {name!r} is already the name of step {seen[name] + 1}")
        for ref in step.recipe.referenced_models():
            if ref in names[i:]:
                lines.append(
                    f"{where(step, path_of_model(step.recipe, ref))}: step {i + 1} uses {ref!r}, "
                    "which is made by a later step (or itself)"
                )
        if name is not None:
            seen.setdefault(name, i)
    return lines


def parse_recipe(
    text: str, source: str = "<recipe>", path: Path | None = None, *, strict: bool = False
) -> LoadedRecipe:
    """Validate a single-step recipe ``text``; ``source`` is how error lines name it."""
    steps = parse_recipes(text, source, path, strict=strict)
    if len(steps) > 1:
        raise RecipeError(
            [f"{source}: has {len(steps)} merge steps; use parse_recipes/load_recipes for multi-step recipes"]
        )
    return steps[0]


def _read_text(path: str | Path) -> tuple[Path, str]:
    p = Path(path)
    try:
        return p, p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([f"{p}: no such recipe file"]) from None
    except IsADirectoryError:
        raise RecipeError([f"{p}: is a folder; expected a recipe YAML file"]) from None
    except UnicodeDecodeError as exc:
        raise RecipeError([f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None


def load_recipes(path: str | Path, *, strict: bool = False) -> list[LoadedRecipe]:
    """Read and validate a recipe file of one or more merge steps."""
    p, text = _read_text(path)
    return parse_recipes(text, source=str(path), path=p.resolve(), strict=strict)


def load_recipe(path: str | Path, *, strict: bool = False) -> LoadedRecipe:
    """Read and validate a single-step recipe file. Raises ``RecipeError`` listing every problem
    (with ``strict``, the warnings too)."""
    p, text = _read_text(path)
    return parse_recipe(text, source=str(path), path=p.resolve(), strict=strict)


def _bounded_setting(valid: Range) -> dict[str, Any]:
    """A parameter setting whose numbers lie in ``valid``: the scalar, each gradient point, each rule's value
    (a scalar or a gradient). JSON-Schema's number keywords ignore other types, so one schema serves every
    shape a setting takes; the setting's structure is checked elsewhere."""
    bounds = valid.json_schema()
    value = {**bounds, "items": bounds}
    return {
        "description": f"numbers must be {valid.describe()}",
        **bounds,
        "items": {**bounds, "properties": {"value": value}},
        "properties": {"value": value},
    }


def _parameter_bounds(defs: dict[str, Any]) -> list[tuple[list[str], str]]:
    """(method names and aliases, the name in ``defs`` of the ``parameters`` schema bounding their
    parameters by ``Param.valid``), methods with the same bounds together; one ``defs`` entry per range.
    Methods whose numbers are unbounded are left out."""
    groups: dict[str, list[str]] = {}
    for name, spec in sorted(REGISTRY.methods.items()):
        props = {}
        for p in spec.params:
            if p.kind == "number" and p.valid.json_schema():
                ref = "setting_" + re.sub(r"\W+", "_", p.valid.describe())
                defs[ref] = _bounded_setting(p.valid)
                props[p.name] = {"$ref": f"#/$defs/{ref}"}
        if props:
            groups.setdefault(json.dumps(props, sort_keys=True), []).extend([name, *spec.aliases])
    out = []
    for props_json, names in groups.items():
        defs[f"{names[0]}_parameters"] = {"properties": json.loads(props_json)}
        out.append((names, f"{names[0]}_parameters"))
    return out


def recipe_json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mergekitlite recipe"
    # Parameter ranges depend on the method: the recipe's merge_method for its models, slices and global
    # parameters; a rule's own method for the rule's parameters.
    defs = schema["$defs"]
    top, rule = [], []
    for names, def_name in _parameter_bounds(defs):
        ref = {"$ref": f"#/$defs/{def_name}"}
        top.append(
            {
                "if": {"properties": {"merge_method": {"enum": names}}, "required": ["merge_method"]},
                "then": {
                    "properties": {
                        "parameters": ref,
                        "models": {"items": {"properties": {"parameters": ref}}},
                        "slices": {
                            "items": {
                                "properties": {
                                    "parameters": ref,
                                    "sources": {"items": {"properties": {"parameters": ref}}},
                                }
                            }
                        },
                    }
                },
            }
        )
        rule.append(
            {
                "if": {"properties": {"method": {"enum": names}}, "required": ["method"]},
                "then": {"properties": {"parameters": ref}},
            }
        )
    schema["allOf"] = top
    defs["Rule"]["allOf"] = rule
    return schema
