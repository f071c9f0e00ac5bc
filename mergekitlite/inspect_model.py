"""``mergekitlite inspect MODEL``: what a checkpoint holds, and whether its special tokens can work.

Reported, from headers and JSON files (no model or tokenizer is instantiated, no remote code runs):

* tensors: count, parameters and bytes per dtype, layers, tied embeddings;
* special tokens with their ids, the eos ids of ``generation_config.json`` (what ``generate`` stops
  on) and of ``config.json``, the chat template and the end-of-turn token it writes;
* for each special token, the L2 norm of its input-embedding row and of its lm_head row, next to
  the distribution of all rows' norms (mean, std, median). A row below ``mean − 2·std`` or below
  half the median looks untrained: a token the model has (almost) never seen or never predicted.
  The row norms come from one chunked ``pread`` pass over each matrix (about a million elements at
  a time, float64 sums), so memory stays at one chunk plus one float per row.

Flags: an untrained-looking special-token row; a chat template whose end-of-turn token is not among
the eos ids (the seed's merge: ChatML turns end with ``<|im_end|>`` but ``generate`` only stopped on
``<|endoftext|>``, so every answer ran to ``max_new_tokens``); a trained end-of-turn token
(``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ... whose output row has a norm like the others)
that is neither an eos id nor closed by the chat template (the same failure with the base model's
metadata and no template at all, as mergekit writes it); an eos or special-token id outside the
embedding matrix. The command exits 0 even with flags (it is a report) unless ``--strict``.
The command itself (tables, JSON file) is ``cli/cmd_inspect.py``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from mergekitlite.budget import CACHE_CHUNK_ELEMENTS
from mergekitlite.io.files import InputFiles
from mergekitlite.io.safetensors_header import FLOAT_CODES, NAME_BY_CODE, TensorInfo
from mergekitlite.roles import Role, find
from mergekitlite.rowscan import read_rows, row_ranges
from mergekitlite.sources import ModelSource, index_model, resolve_model_path
from mergekitlite.tokens import TokenInfo, read_token_info

# A row is "untrained-looking" below mean − STD_FACTOR·std or below MEDIAN_FACTOR × median.
STD_FACTOR = 2.0
MEDIAN_FACTOR = 0.5
# Texts of end-of-turn / end-of-text tokens across families, without their brackets: ChatML's <|im_end|>,
# Llama 3's <|eot_id|> and <|end_of_text|>, Gemma's <end_of_turn>, Phi-3's <|end|>, GPT-2's
# <|endoftext|>, Llama 2's </s>, <eos>. Exact words, so that <|end_header_id|> is not one.
END_OF_TURN_WORDS = frozenset(
    {"im_end", "eot_id", "eot", "end_of_turn", "end", "endoftext", "end_of_text", "/s", "eos"}
)


@dataclass(frozen=True)
class RowStats:
    """Distribution of the L2 norms of a matrix's rows."""

    tensor: str
    rows: int
    mean: float
    std: float
    median: float
    min: float
    max: float

    @property
    def threshold(self) -> float:
        """Norms below this look untrained."""
        return max(self.mean - STD_FACTOR * self.std, MEDIAN_FACTOR * self.median)


@dataclass(frozen=True)
class TokenRow:
    """One special token: its id, what it is used for, and its rows' norms (None: no such row)."""

    token: str
    id: int
    roles: tuple[str, ...]
    embed_norm: float | None
    lm_head_norm: float | None
    untrained: tuple[str, ...] = ()  # "embedding" and/or "lm_head"
    notes: tuple[str, ...] = ()


@dataclass
class InspectResult:
    path: str
    tensors: int
    params: int
    bytes: int
    params_by_dtype: dict[str, int]
    layers: int
    tied_embeddings: bool
    embed_tensor: str | None
    lm_head_tensor: str | None
    eos_token: str | None
    generation_eos: list[int]
    config_eos: list[int]
    has_generation_config: bool
    chat_template: bool
    turn_end_tokens: list[str]
    stop_ids: list[int]  # what generate() stops on: generation_config's eos, else config's
    embed_stats: RowStats | None = None
    lm_head_stats: RowStats | None = None
    tokens: list[TokenRow] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        for key, stats in (("embed_stats", self.embed_stats), ("lm_head_stats", self.lm_head_stats)):
            if stats is not None:
                data[key]["threshold"] = stats.threshold
        return data


# ------------------------------------------------------------------------------------------ measuring


def find_matrix(source: ModelSource, role: Role, rows: int | None = None) -> TensorInfo | None:
    """The float token embedding or output head of ``source`` (see ``roles.find``)."""
    floats = {n: i for n, i in source.tensors.items() if i.dtype in FLOAT_CODES}
    name = find(floats, role, rows=rows, vocab_size=source.config_value("vocab_size", "padded_vocab_size"))
    return None if name is None else floats[name]


def row_norms(files: InputFiles, info: TensorInfo, chunk_elements: int = CACHE_CHUNK_ELEMENTS) -> torch.Tensor:
    """L2 norm of every row of a 2-D tensor (float64), read in row chunks."""
    rows, cols = info.shape
    out = torch.empty(rows, dtype=torch.float64)
    for first, count in row_ranges(info, chunk_elements):
        chunk = read_rows(files, info, first, count).view(count, cols)
        out[first : first + count] = torch.linalg.vector_norm(chunk, dim=1)
    return out


def norm_stats(name: str, norms: torch.Tensor) -> RowStats:
    return RowStats(
        tensor=name,
        rows=len(norms),
        mean=float(norms.mean()),
        std=float(norms.std()) if len(norms) > 1 else 0.0,
        median=float(norms.median()),
        min=float(norms.min()),
        max=float(norms.max()),
    )


def token_roles(tokens: TokenInfo, pad_id: int | None = None) -> dict[int, list[str]]:
    """id → what the model uses it for (eos ids first, then every special / added token)."""
    roles: dict[int, list[str]] = {}

    def add(token_id: int, role: str) -> None:
        roles.setdefault(token_id, [])
        if role not in roles[token_id]:
            roles[token_id].append(role)

    for i in tokens.generation_eos:
        add(i, "generation eos")
    for i in tokens.config_eos:
        add(i, "config eos")
    if tokens.eos_token in tokens.ids:
        add(tokens.ids[tokens.eos_token], "tokenizer eos")
    for t in tokens.turn_end_tokens():
        add(tokens.ids[t], "chat-template end of turn")
    if pad_id is not None:
        add(pad_id, "config pad")
    for t, i in tokens.ids.items():
        if tokens.chat_template and t in tokens.chat_template:
            add(i, "in chat template")
        add(i, "special" if t in tokens.special else "added")
    return roles


def stop_ids(tokens: TokenInfo, has_generation_config: bool) -> list[int]:
    """What ``generate`` stops on: generation_config.json's eos ids when the file exists, else config.json's."""
    return list(tokens.generation_eos) if has_generation_config and tokens.generation_eos else list(tokens.config_eos)


def template_flags(tokens: TokenInfo, stops: Sequence[int]) -> list[str]:
    """A chat template whose end-of-turn token generation does not stop on (the seed's failure)."""
    if not tokens.chat_template:
        return []
    flags = []
    for t in tokens.turn_end_tokens():
        if tokens.ids[t] not in stops:
            where = f"eos ids {list(stops)}" if stops else "no eos id at all"
            flags.append(
                f"the chat template ends turns with {t} (id {tokens.ids[t]}) but generation stops on {where}: "
                f"chat answers will run to max_new_tokens (add {tokens.ids[t]} to eos_token_id in "
                "generation_config.json)"
            )
    return flags


def reads_as_end_of_turn(token: str) -> bool:
    """``<|im_end|>``, ``</s>``, ``<end_of_turn>``, ...: a token that closes a turn or a text."""
    return token.strip("<>|[]").lower() in END_OF_TURN_WORDS


def open_and_inspect(ref: str, chunk_elements: int = CACHE_CHUNK_ELEMENTS) -> InspectResult:
    """``inspect_model`` of a model folder or hub id."""
    path, hub = resolve_model_path(ref)
    return inspect_model(index_model(ref, path, hub), chunk_elements)


def inspect_model(source: ModelSource, chunk_elements: int = CACHE_CHUNK_ELEMENTS) -> InspectResult:
    """Everything the module docstring lists, for one indexed model."""
    tokens = read_token_info(source.path)
    has_gen = (source.path / "generation_config.json").is_file()
    by_dtype: Counter[str] = Counter()
    for info in source.tensors.values():
        by_dtype[NAME_BY_CODE.get(info.dtype, info.dtype)] += info.numel
    embed = find_matrix(source, Role.EMBEDDING)
    head = find_matrix(source, Role.HEAD, rows=embed.shape[0] if embed else None)
    stops = stop_ids(tokens, has_gen)
    result = InspectResult(
        path=str(source.path),
        tensors=len(source.tensors),
        params=sum(by_dtype.values()),
        bytes=sum(i.nbytes for i in source.tensors.values()),
        params_by_dtype=dict(by_dtype),
        layers=source.layer_counts.get(source.main_layer_prefix() or "", 0),
        tied_embeddings=head is None and embed is not None,
        embed_tensor=embed.name if embed else None,
        lm_head_tensor=head.name if head else None,
        eos_token=tokens.eos_token,
        generation_eos=list(tokens.generation_eos),
        config_eos=list(tokens.config_eos),
        has_generation_config=has_gen,
        chat_template=tokens.chat_template is not None,
        turn_end_tokens=tokens.turn_end_tokens(),
        stop_ids=stops,
    )
    norms: dict[str, torch.Tensor] = {}
    with InputFiles() as files:
        for label, info in (("embedding", embed), ("lm_head", head)):
            if info is not None:
                norms[label] = row_norms(files, info, chunk_elements)
    result.embed_stats = norm_stats(embed.name, norms["embedding"]) if embed else None
    result.lm_head_stats = norm_stats(head.name, norms["lm_head"]) if head else None
    pad = source.config_value("pad_token_id")
    result.tokens = _token_rows(tokens, norms, result, pad if isinstance(pad, int) else None)
    result.flags = _flags(tokens, stops, result)
    return result


def _token_rows(
    tokens: TokenInfo, norms: dict[str, torch.Tensor], result: InspectResult, pad_id: int | None
) -> list[TokenRow]:
    names = {i: t for t, i in tokens.ids.items()}
    stats = {"embedding": result.embed_stats, "lm_head": result.lm_head_stats}
    rows = []
    for token_id, roles in sorted(token_roles(tokens, pad_id).items()):
        values: dict[str, float | None] = {}
        untrained, notes = [], []
        for label, vec in norms.items():
            value = float(vec[token_id]) if 0 <= token_id < len(vec) else None
            values[label] = value
            st = stats[label]
            if value is None or st is None or value >= st.threshold:
                continue
            if label == "embedding" and token_id == pad_id:
                # nn.Embedding(padding_idx=pad) keeps that row at zero and never updates it: by design.
                notes.append("pad row: small by design")
            else:
                untrained.append(label)
        rows.append(
            TokenRow(
                token=names.get(token_id, f"<id {token_id}>"),
                id=token_id,
                roles=tuple(roles),
                embed_norm=values.get("embedding"),
                lm_head_norm=values.get("lm_head"),
                untrained=tuple(untrained),
                notes=tuple(notes),
            )
        )
    return rows


def _flags(tokens: TokenInfo, stops: Sequence[int], result: InspectResult) -> list[str]:
    flags = template_flags(tokens, stops)
    rows = result.embed_stats.rows if result.embed_stats else None
    for row in result.tokens:
        if rows is not None and not 0 <= row.id < rows:
            flags.append(f"{row.token} (id {row.id}, {', '.join(row.roles)}) is outside the embedding's {rows} rows")
        for label in row.untrained:
            st = result.embed_stats if label == "embedding" else result.lm_head_stats
            value = row.embed_norm if label == "embedding" else row.lm_head_norm
            effect = "the model barely reads it as input" if label == "embedding" else "the model can hardly emit it"
            flags.append(
                f"{row.token} (id {row.id}, {', '.join(row.roles)}): its {label} row looks untrained "
                f"(norm {fmt_norm(value)}; all rows: {describe_norms(st)}): {effect}"
            )
    return flags + unstoppable_end_flags(tokens, stops, result)


def unstoppable_end_flags(tokens: TokenInfo, stops: Sequence[int], result: InspectResult) -> list[str]:
    """A trained end-of-turn token that generation does not stop on and no chat template closes turns with.

    The model can emit it (its output row's norm is like the other rows'), so a chat model or a chat-vector
    merge will end its answers with it, and ``generate`` runs on to ``max_new_tokens``: the seed's merge,
    with the base model's ``generation_config.json`` (eos ``<|endoftext|>``) and no chat template. A
    template that does close turns with it is ``template_flags``' case.
    """
    closed_by_template = set(tokens.turn_end_tokens())
    # The output head decides what the model emits; with tied embeddings it is the embedding.
    label = "lm_head" if result.lm_head_stats is not None else "embedding"
    stats = result.lm_head_stats or result.embed_stats
    if stats is None:
        return []
    where = f"eos ids {list(stops)}" if stops else "no eos id at all"
    template = "the chat template does not end turns with it" if tokens.chat_template else "there is no chat template"
    flags = []
    for row in result.tokens:
        norm = row.lm_head_norm if label == "lm_head" else row.embed_norm
        if (
            row.token not in tokens.special
            or not reads_as_end_of_turn(row.token)
            or row.id in stops
            or row.token in closed_by_template
            or norm is None
            or norm < stats.threshold
        ):
            continue
        flags.append(
            f"{row.token} (id {row.id}) ends turns and the model can emit it (its {label} row's norm "
            f"{fmt_norm(norm)} is like the others': {describe_norms(stats)}), but generation stops on {where} and "
            f"{template}: answers that end with "
            f"{row.token} will run on to max_new_tokens (add {row.id} to eos_token_id in generation_config.json, "
            "or take tokenizer, chat template and generation_config.json from the chat model: tokenizer_source)"
        )
    return flags


def fmt_norm(value: float | None) -> str:
    """A norm as the flags and tables show it."""
    return "—" if value is None or math.isnan(value) else f"{value:.3g}"


def describe_norms(st: RowStats | None) -> str:
    if st is None:
        return "no statistics"
    return f"mean {st.mean:.3g}, std {st.std:.3g}, median {st.median:.3g}"
