"""``mergekitlite eval OUT --against MODEL ...``: measure a merged model side by side with its parents.

Every model is fed the same token ids, made by one tokenizer (the merged model's), so the numbers
are comparable; every model must therefore share the merged model's vocabulary. Measured for each:

* **perplexity** of a text file: ``exp`` of the token-weighted mean negative log-likelihood. The
  text is cut into sliding windows of ``max_length`` tokens whose ends are ``stride`` apart; each
  token is scored once, in the first window that reaches it, so it has at least
  ``max_length − stride`` tokens of context (except near the start). The first token has no
  context and is not scored.
* **EOS-termination rate**: each prompt is rendered with the chat template as a user turn plus the
  assistant header, then greedily continued (argmax, no sampling, no repetition penalty) for at most
  ``max_new_tokens``; a generation terminates if it emits one of the model's own stop ids (its
  ``generation_config.json`` eos ids, else ``config.json``'s: what ``generate`` stops on when a user
  runs it). The seed's merge would score 0 here: it never emitted its end token.
* **end-of-turn probability**: with the prompt and the reference answer teacher-forced, the
  probability of the chat template's end-of-turn token (else eos) as the next token; mean and min
  over the prompts. A model that has learnt to close its turn puts most of its mass there.
* **KL(merged ‖ parent)**: the mean over the first ``kl_tokens`` scored positions of the text of
  ``Σ p_merged · (log p_merged − log p_parent)`` over the vocabulary, both next-token
  distributions computed with the same context.
* the first generations, side by side.

Models are loaded one at a time (the merged model first), so peak memory is one model plus the
merged model's log-probabilities at the KL positions (``kl_tokens × vocab`` float32 values).
Loading follows the seed's author: with ``--device auto`` or a memory limit, accelerate's
``device_map="auto"`` places layers within ``max_memory`` and offloads the rest to disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from mergekitlite.errors import MergekitliteError
from mergekitlite.inspect_model import stop_ids
from mergekitlite.sources import ModelSource, index_model, resolve_model_path
from mergekitlite.tokens import TokenInfo, read_token_info

DEFAULT_MAX_LENGTH = 2048  # cap on the window when the model's context is longer: logits are window × vocab
LOGPROB_ROWS = 256  # positions per log_softmax: bounds the float32 temporaries to 256 × vocab
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length", "n_ctx")


def default_prompts() -> Path:
    """The Japanese + English prompt set shipped with the package."""
    return Path(str(resources.files("mergekitlite").joinpath("data/prompts_ja_en.yaml")))


# ------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class PromptCase:
    prompt: str
    reference: str | None = None


def load_prompts(path: Path) -> list[PromptCase]:
    """A YAML list of ``{prompt, reference}`` mappings; every problem is reported at once."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergekitliteError(f"--prompts {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise MergekitliteError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, list) or not data:
        raise MergekitliteError(f"{path}: expected a non-empty list of {{prompt: ..., reference: ...}} entries")
    problems, cases = [], []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            problems.append(f"{path}: item {i}: expected a mapping with 'prompt' and 'reference'")
            continue
        unknown = set(item) - {"prompt", "reference"}
        if unknown:
            problems.append(f"{path}: item {i}: unknown key(s) {sorted(unknown)} (expected prompt, reference)")
        prompt, reference = item.get("prompt"), item.get("reference")
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"{path}: item {i}: 'prompt' must be a non-empty string")
        if reference is not None and not isinstance(reference, str):
            problems.append(f"{path}: item {i}: 'reference' must be a string")
        cases.append(PromptCase(str(prompt), reference if isinstance(reference, str) else None))
    if problems:
        raise MergekitliteError("\n".join(problems))
    return cases


@dataclass(frozen=True)
class Window:
    """Tokens ``begin:end`` are fed; targets ``first_target:end`` are scored."""

    begin: int
    end: int
    first_target: int


def plan_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Windows ending ``stride`` tokens apart, each the last ``max_length`` tokens up to its end, each
    scoring the tokens after the previous window's end: every token but the first is scored exactly
    once, with at least ``max_length − stride`` tokens of context (fewer only at the start)."""
    if max_length < 2 or not 1 <= stride < max_length:
        raise MergekitliteError(
            f"need max_length ≥ 2 and 1 ≤ stride < max_length, so that every scored token has context "
            f"(got max_length {max_length}, stride {stride})"
        )
    windows: list[Window] = []
    scored_to, end = 1, min(max_length, n_tokens)
    while scored_to < n_tokens:
        windows.append(Window(max(0, end - max_length), end, scored_to))
        scored_to, end = end, min(end + stride, n_tokens)
    return windows


def context_length(source: ModelSource) -> int | None:
    value = source.config_value(*_CONTEXT_KEYS)
    return int(value) if isinstance(value, int) and value > 0 else None


# ------------------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"  # cpu, cuda, cuda:N, mps, or auto (accelerate places the layers)
    dtype: str = "auto"  # auto (the checkpoint's), float32, bfloat16, float16
    max_ram: int | None = None  # bytes of RAM for weights; the rest goes to disk
    max_vram: int | None = None  # bytes of GPU memory for weights (per GPU used)
    offload_folder: Path | None = None  # where disk-offloaded weights go (default: a temporary folder)
    trust_remote_code: bool = False

    @property
    def dispatched(self) -> bool:
        """Whether accelerate places the layers (``device_map="auto"``)."""
        return self.device == "auto" or self.max_ram is not None or self.max_vram is not None


def _gpu_keys(device: str) -> list[int] | None:
    """GPU indices a device string selects; None: all of them."""
    if device == "auto":
        return None
    dev = torch.device(device)
    if dev.type != "cuda":
        return []
    return [dev.index or 0]


def max_memory(options: LoadOptions) -> dict[int | str, int] | None:
    """accelerate's ``max_memory`` for the options: its defaults (what is free), with --max-ram for
    "cpu" and --max-vram for each GPU used, and GPUs not selected by --device left out."""
    if options.max_ram is None and options.max_vram is None:
        return None
    from accelerate.utils import get_max_memory

    budget: dict[int | str, int] = {}
    selected = _gpu_keys(options.device)
    for key, free in get_max_memory().items():
        if isinstance(key, int):
            if selected is None or key in selected:
                budget[key] = options.max_vram if options.max_vram is not None else free
        elif key == "cpu":
            budget[key] = options.max_ram if options.max_ram is not None else free
    return budget


def from_pretrained_kwargs(options: LoadOptions, offload_dir: Path) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": options.dtype if options.dtype == "auto" else getattr(torch, options.dtype),
        "trust_remote_code": options.trust_remote_code,
    }
    if options.dispatched:
        kwargs["device_map"] = "auto"
        kwargs["offload_folder"] = str(offload_dir)
        budget = max_memory(options)
        if budget is not None:
            kwargs["max_memory"] = budget
    else:
        kwargs["device_map"] = options.device
    return kwargs


def check_device(options: LoadOptions) -> None:
    if options.device != "auto":
        from mergekitlite.execute import resolve_device

        resolve_device(options.device)
    if options.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise MergekitliteError(f"--dtype {options.dtype!r}: expected auto, float32, bfloat16 or float16")


def _load_error(what: str, path: Path, exc: Exception) -> MergekitliteError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    remote = "trust_remote_code" in str(exc)
    hint = " (it ships its own code: add --trust-remote-code if you trust it)" if remote else ""
    return MergekitliteError(f"cannot load the {what} of {path}: {text}{hint}")


@contextmanager
def loaded_model(path: Path, options: LoadOptions) -> Iterator[Any]:
    """The model at ``path``, in eval mode; freed (and its offload folder removed) on exit."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="mkl-offload-", dir=options.offload_folder) as offload:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs(options, Path(offload)))
        except (OSError, ValueError, ImportError, KeyError) as exc:
            raise _load_error("model", path, exc) from None
        model.eval()
        try:
            yield model
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def load_tokenizer(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise _load_error("tokenizer", path, exc) from None


def input_device(model: Any) -> torch.device:
    """Where inputs go: the first GPU of a dispatched model's device map, else its first parameter's device."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        for where in device_map.values():
            if isinstance(where, int):
                return torch.device("cuda", where)
            if isinstance(where, torch.device):
                return where
            if where not in ("cpu", "disk", "meta"):
                return torch.device(where)
        return torch.device("cpu")
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------ vocabulary


def vocabulary_problems(
    merged_name: str,
    merged_vocab: dict[str, int],
    merged_rows: int | None,
    name: str,
    vocab: dict[str, int],
    rows: int | None,
) -> list[str]:
    """Why ``name`` cannot be compared token for token with the merged model (empty: it can)."""
    problems = []
    if vocab != merged_vocab:
        differ = [t for t, i in merged_vocab.items() if vocab.get(t) != i]
        extra = [t for t in vocab if t not in merged_vocab]
        example = ""
        if differ:
            t = differ[0]
            there = f"id {vocab[t]}" if t in vocab else "absent"
            example = f"; e.g. {t!r} is id {merged_vocab[t]} in {merged_name} but {there} in {name}"
        elif extra:
            example = f"; e.g. {extra[0]!r} (id {vocab[extra[0]]}) exists only in {name}"
        problems.append(
            f"{name}: its tokenizer vocabulary differs from the merged model's ({len(vocab)} vs {len(merged_vocab)} "
            f"tokens{example}). eval compares next-token distributions (KL) and perplexities over one set of token "
            "ids, so every model must share the merged model's vocabulary"
        )
    if rows is not None and merged_rows is not None and rows != merged_rows:
        problems.append(
            f"{name}: its output layer has {rows} rows (config vocab_size) but {merged_name}'s has {merged_rows}: "
            "next-token distributions over different vocabularies cannot be compared"
        )
    return problems


# ------------------------------------------------------------------------------------------ measuring


def supports_logits_to_keep(model: Any) -> bool:
    """transformers' own causal LMs can compute logits for the last positions only (saving window × vocab)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def last_logits(model: Any, ids: torch.Tensor, keep: int, device: torch.device) -> torch.Tensor:
    """Logits ``[keep, vocab]`` of the last ``keep`` positions for one sequence of token ids."""
    kwargs = {"logits_to_keep": keep} if supports_logits_to_keep(model) else {}
    with torch.inference_mode():
        out = model(input_ids=ids.view(1, -1).to(device), use_cache=False, **kwargs)
    return out.logits[0, -keep:]


def iter_logprobs(
    model: Any, ids: torch.Tensor, windows: Sequence[Window], device: torch.device, rows: int = LOGPROB_ROWS
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(targets, log-probs)`` in text order: the float32 log-softmax of the positions predicting
    each scored token, ``rows`` positions at a time."""
    for w in windows:
        # Position j predicts token j + 1: the scored targets first_target..end-1 need the logits of
        # positions first_target-1..end-2, i.e. the last (end - first_target + 1) minus the very last.
        logits = last_logits(model, ids[w.begin : w.end], w.end - w.first_target + 1, device)[:-1]
        targets = ids[w.first_target : w.end]
        for s in range(0, len(targets), rows):
            lp = torch.log_softmax(logits[s : s + rows].float(), dim=-1)
            yield targets[s : s + rows].to(lp.device), lp


@dataclass
class TextScore:
    nll_sum: float = 0.0
    tokens: int = 0
    kept: torch.Tensor | None = None  # log-probs at the KL positions (the merged model's)
    kl: torch.Tensor | None = None  # KL(reference ‖ model) at each KL position

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else math.nan


def score_text(
    model: Any,
    ids: torch.Tensor,
    windows: Sequence[Window],
    device: torch.device,
    *,
    kl_tokens: int,
    reference: torch.Tensor | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> TextScore:
    """Negative log-likelihood over the windows, plus, for the first ``kl_tokens`` scored positions,
    either the log-probs themselves (``reference`` None) or KL(reference ‖ model) at each position.
    ``on_tokens(n)`` is called as each n scored positions are done (for a progress bar)."""
    score = TextScore()
    kept, kl = [], []
    pos = 0
    for targets, lp in iter_logprobs(model, ids, windows, device):
        score.nll_sum -= float(lp.gather(1, targets.view(-1, 1)).sum(dtype=torch.float64))
        score.tokens += len(targets)
        take = min(kl_tokens - pos, len(targets))
        if take > 0:
            rows = lp[:take].cpu()
            if reference is None:
                kept.append(rows.clone())
            else:
                ref = reference[pos : pos + take]
                kl.append(torch.nn.functional.kl_div(rows, ref, reduction="none", log_target=True).sum(-1))
            pos += take
        if on_tokens is not None:
            on_tokens(len(targets))
    if kept:
        score.kept = torch.cat(kept)
    if kl:
        score.kl = torch.cat(kl)
    return score


def greedy_config(stops: Sequence[int], pad_id: int | None, max_new_tokens: int) -> Any:
    """A generation config for plain greedy decoding that stops on ``stops``.

    It replaces the model's own generation config rather than overriding it: ``generate`` fills
    every unset field from the model's config, which could bring in a repetition penalty, a
    minimum length or suppressed tokens and make the run depend on more than the weights.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stops) or None,
        pad_token_id=pad_id if pad_id is not None else (stops[0] if stops else 0),
    )


def greedy_generate(model: Any, prompt_ids: Sequence[int], config: Any, device: torch.device) -> list[int]:
    """The new token ids of a greedy continuation of ``prompt_ids`` (``generate`` with ``config``)."""
    ids = torch.tensor([list(prompt_ids)], device=device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt_ids) :].tolist()


def end_probability(
    model: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int], end_id: int, device: torch.device
) -> float:
    """P(end_id | prompt + answer): the probability of closing the turn right after the reference answer."""
    logits = last_logits(model, torch.tensor([*prompt_ids, *answer_ids]), 1, device)
    return float(torch.softmax(logits[-1].float(), dim=-1)[end_id])


# ------------------------------------------------------------------------------------------ one model


@dataclass(frozen=True)
class PreparedPrompt:
    prompt: str
    reference: str | None
    prompt_ids: tuple[int, ...]  # the rendered user turn + assistant header
    answer_ids: tuple[int, ...]  # the reference answer (empty without one)


@dataclass(frozen=True)
class EvalSetup:
    """Everything that is the same for every model: token ids, windows, prompts, the end token."""

    text_ids: torch.Tensor | None
    windows: tuple[Window, ...]
    prompts: tuple[PreparedPrompt, ...]
    end_token: str
    end_id: int
    max_new_tokens: int
    kl_tokens: int


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str  # the new tokens, decoded, up to (not including) the stop token
    new_tokens: int  # tokens generated, the stop token included
    terminated: bool


@dataclass
class ModelResult:
    name: str
    path: str
    role: str  # "merged" or "parent"
    stop_ids: list[int]
    perplexity: float | None = None
    text_tokens: int = 0
    termination_rate: float | None = None
    mean_new_tokens: float | None = None
    end_prob_mean: float | None = None
    end_prob_min: float | None = None
    kl_mean: float | None = None  # KL(merged ‖ this model), nats per token; parents only
    generations: list[Generation] = field(default_factory=list)
    seconds: float = 0.0


class EvalProgress(Protocol):
    def start(self, label: str, total: int) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def note(self, message: str) -> None: ...


class NullProgress:
    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def measure_generations(
    model: Any, tokenizer: Any, setup: EvalSetup, stops: Sequence[int], device: torch.device, progress: EvalProgress
) -> list[Generation]:
    config = greedy_config(stops, tokenizer.pad_token_id, setup.max_new_tokens)
    # generate() fills unset fields from model.generation_config: the greedy config must be the model's own.
    model.generation_config = config
    results = []
    progress.start("generating", len(setup.prompts))
    for p in setup.prompts:
        new = greedy_generate(model, p.prompt_ids, config, device)
        stop_at = next((i for i, t in enumerate(new) if t in stops), None)
        body = new if stop_at is None else new[:stop_at]
        text = tokenizer.decode(body, skip_special_tokens=False)
        results.append(Generation(p.prompt, text, len(new) if stop_at is None else stop_at + 1, stop_at is not None))
        progress.advance()
    return results


def evaluate_model(
    model: Any,
    tokenizer: Any,
    name: str,
    path: Path,
    role: str,
    setup: EvalSetup,
    reference: torch.Tensor | None,
    progress: EvalProgress,
) -> tuple[ModelResult, torch.Tensor | None]:
    """All measurements of one loaded model; also returns its KL-position log-probs when ``reference`` is None."""
    start = time.perf_counter()
    device = input_device(model)
    info = read_token_info(path)
    stops = stop_ids(info, (path / "generation_config.json").is_file())
    result = ModelResult(name=name, path=str(path), role=role, stop_ids=stops)
    kept = None
    if setup.text_ids is not None:
        progress.start("perplexity", int(sum(w.end - w.first_target for w in setup.windows)))
        score = score_text(
            model,
            setup.text_ids,
            setup.windows,
            device,
            kl_tokens=setup.kl_tokens,
            reference=reference,
            on_tokens=progress.advance,
        )
        result.perplexity, result.text_tokens = score.perplexity, score.tokens
        kept = score.kept
        if score.kl is not None and len(score.kl):
            result.kl_mean = float(score.kl.mean(dtype=torch.float64))
    if setup.prompts:
        gens = measure_generations(model, tokenizer, setup, stops, device, progress)
        result.generations = gens
        if stops:
            result.termination_rate = sum(g.terminated for g in gens) / len(gens)
        result.mean_new_tokens = sum(g.new_tokens for g in gens) / len(gens)
        with_answer = [p for p in setup.prompts if p.answer_ids]
        if with_answer:
            progress.start("end-token probability", len(with_answer))
            probs = []
            for p in with_answer:
                probs.append(end_probability(model, p.prompt_ids, p.answer_ids, setup.end_id, device))
                progress.advance()
            result.end_prob_mean, result.end_prob_min = sum(probs) / len(probs), min(probs)
    result.seconds = time.perf_counter() - start
    return result, kept


# ------------------------------------------------------------------------------------------ the whole run


@dataclass(frozen=True)
class EvalOptions:
    text: Path | None = None
    prompts: Path | None = None  # None: the packaged prompt set
    max_prompts: int | None = None
    chat_template_from: str | None = None
    max_new_tokens: int = 256
    max_length: int | None = None
    stride: int | None = None
    max_text_tokens: int | None = None
    kl_tokens: int = 512
    load: LoadOptions = LoadOptions()


@dataclass
class EvalReport:
    merged: str
    settings: dict[str, Any]
    models: list[ModelResult]

    def to_json(self) -> dict[str, Any]:
        return _finite(dataclasses.asdict(self))


def _finite(value: Any) -> Any:
    """NaN/inf → None, recursively (they are not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _templates_dir() -> Path:
    return Path(str(resources.files("mergekitlite").joinpath("templates")))


def choose_chat_template(explicit: str | None, models: Sequence[tuple[str, Path]]) -> tuple[str | None, str]:
    """(template, where it came from). ``explicit`` is a model (folder or hub id), a .jinja file or
    the name of a built-in template; by default the merged model's own (``models[0]``), else the first
    other model that has one."""
    if explicit:
        as_file = Path(explicit).expanduser()
        if as_file.is_file():
            return as_file.read_text(encoding="utf-8"), f"file {as_file}"
        builtin = _templates_dir() / f"{explicit}.jinja"
        if not as_file.exists() and builtin.is_file():
            return builtin.read_text(encoding="utf-8"), f"built-in template {explicit!r}"
        path, _ = resolve_model_path(explicit)
        template = read_token_info(path).chat_template
        if template is None:
            raise MergekitliteError(f"--chat-template-from {explicit}: {path} has no chat template")
        return template, f"{explicit} (--chat-template-from)"
    for i, (name, path) in enumerate(models):
        template = read_token_info(path).chat_template
        if template is not None:
            return template, name + (" (the merged model's own)" if i == 0 else " (the merged model has none)")
    return None, "none of the models has one: prompts are fed as plain text"


def _looks_special(token: str) -> bool:
    return (token.startswith("<") and token.endswith(">")) or (token.startswith("[") and token.endswith("]"))


def end_token_of(tokens: TokenInfo, template: str | None, tokenizer: Any, stops: Sequence[int]) -> tuple[str, int]:
    """The token whose probability is measured after each answer: the chat template's end-of-turn
    token (the first it writes), else the tokenizer's eos, else the merged model's first stop id.

    The template's special tokens are looked up in the loaded tokenizer too: tokenizers without a
    tokenizer.json (Qwen-14B's tiktoken) list them nowhere in their JSON files.
    """
    if template:
        marked = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()) | tokens.special
        literal = {
            t: i
            for t, i in tokenizer.get_vocab().items()
            if isinstance(t, str) and len(t) > 1 and t in template and (t in marked or _looks_special(t))
        }
        found = dataclasses.replace(
            tokens, ids={**literal, **tokens.ids}, special=tokens.special | set(literal), chat_template=template
        )
        ends = found.turn_end_tokens()
        if ends:
            first = min(ends, key=template.index)
            return first, found.ids[first]
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token, int(tokenizer.eos_token_id)
    if stops:
        return str(tokenizer.convert_ids_to_tokens(stops[0])), stops[0]
    raise MergekitliteError(
        "the merged model has no end token: no chat-template end of turn, no tokenizer eos and no "
        "eos id in generation_config.json or config.json"
    )


def render_prompt(tokenizer: Any, template: str | None, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a user turn followed by the assistant header (plain text + newline
    without a template)."""
    if template is None:
        return list(tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"])
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except TemplateError as exc:
        raise MergekitliteError(f"the chat template cannot render a user turn: {exc}") from None
    # The template writes any BOS itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prepare_prompts(tokenizer: Any, template: str | None, cases: Sequence[PromptCase]) -> tuple[PreparedPrompt, ...]:
    out = []
    for case in cases:
        answer = tokenizer(case.reference, add_special_tokens=False)["input_ids"] if case.reference else []
        out.append(
            PreparedPrompt(
                case.prompt, case.reference, tuple(render_prompt(tokenizer, template, case.prompt)), tuple(answer)
            )
        )
    return tuple(out)


def text_ids(tokenizer: Any, path: Path, limit: int | None) -> torch.Tensor:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergekitliteError(f"--text {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise MergekitliteError(f"--text {path}: not UTF-8 text ({exc})") from None
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    if limit is not None:
        ids = ids[:limit]
    if len(ids) < 2:
        raise MergekitliteError(f"--text {path}: needs at least 2 tokens to score (has {len(ids)})")
    return torch.tensor(ids, dtype=torch.long)


def open_models(merged: str, against: Sequence[str]) -> list[tuple[str, ModelSource]]:
    """Resolve and index (headers only) every model; all problems are reported at once."""
    problems, sources = [], []
    for ref in [merged, *against]:
        try:
            path, hub = resolve_model_path(ref)
            sources.append((ref, index_model(ref, path, hub)))
        except MergekitliteError as exc:
            problems.append(str(exc))
    if problems:
        raise MergekitliteError("\n".join(problems))
    return sources


def prepare(
    options: EvalOptions, models: Sequence[tuple[str, ModelSource]], tokenizers: Sequence[Any]
) -> tuple[EvalSetup, dict[str, Any]]:
    """Token ids, windows and prompts shared by every model, and the settings to report."""
    merged_name, merged = models[0]
    tokenizer = tokenizers[0]
    problems = []
    merged_vocab = tokenizer.get_vocab()
    merged_rows = merged.config_value("vocab_size")
    for (name, source), tok in zip(models[1:], tokenizers[1:], strict=True):
        problems += vocabulary_problems(
            merged_name, merged_vocab, merged_rows, name, tok.get_vocab(), source.config_value("vocab_size")
        )
    if problems:
        raise MergekitliteError("\n".join(problems))

    contexts = [c for c in (context_length(s) for _, s in models) if c]
    max_length = options.max_length or min([*contexts, DEFAULT_MAX_LENGTH])
    stride = options.stride or max(1, max_length // 2)
    ids = text_ids(tokenizer, options.text, options.max_text_tokens) if options.text else None
    windows = tuple(plan_windows(len(ids), max_length, stride)) if ids is not None else ()

    template, template_source = choose_chat_template(options.chat_template_from, [(n, s.path) for n, s in models])
    prompts_path = options.prompts or default_prompts()
    cases = load_prompts(prompts_path)[: options.max_prompts]
    merged_tokens = read_token_info(merged.path)
    merged_stops = stop_ids(merged_tokens, (merged.path / "generation_config.json").is_file())
    end_token, end_id = end_token_of(merged_tokens, template, tokenizer, merged_stops)
    setup = EvalSetup(
        ids,
        windows,
        prepare_prompts(tokenizer, template, cases),
        end_token,
        end_id,
        options.max_new_tokens,
        options.kl_tokens,
    )
    settings = {
        "text": str(options.text) if options.text else None,
        "text_tokens": len(ids) - 1 if ids is not None else 0,
        "max_length": max_length,
        "stride": stride,
        "windows": len(windows),
        "kl_tokens": min(options.kl_tokens, len(ids) - 1) if ids is not None else 0,
        "prompts": str(prompts_path),
        "prompt_count": len(cases),
        "chat_template_from": template_source,
        "end_token": end_token,
        "end_token_id": end_id,
        "max_new_tokens": options.max_new_tokens,
        "decoding": "greedy (argmax; no sampling, no repetition penalty)",
        "tokenizer": f"{merged_name} (shared by every model)",
        "device": options.load.device,
        "dtype": options.load.dtype,
        "max_ram": options.load.max_ram,
        "max_vram": options.load.max_vram,
    }
    return setup, settings


def run_eval(
    merged: str,
    against: Sequence[str],
    options: EvalOptions,
    progress: EvalProgress | None = None,
    models: list[tuple[str, ModelSource]] | None = None,
) -> EvalReport:
    """Measure the merged model, then each model in ``against``, one loaded at a time. ``models``: their
    ``open_models`` result, when the caller has it already."""
    progress = progress or NullProgress()
    check_device(options.load)
    models = models if models is not None else open_models(merged, against)
    tokenizers = [load_tokenizer(s.path, options.load.trust_remote_code) for _, s in models]
    setup, settings = prepare(options, models, tokenizers)
    results: list[ModelResult] = []
    reference = None
    for i, (name, source) in enumerate(models):
        role = "merged" if i == 0 else "parent"
        progress.note(f"loading {name} ({role})")
        with loaded_model(source.path, options.load) as model:
            # Every model is fed the merged tokenizer's ids (checked identical); only the stop ids are its own.
            result, kept = evaluate_model(model, tokenizers[0], name, source.path, role, setup, reference, progress)
        if i == 0:
            reference = kept
        results.append(result)
        progress.note(f"{name}: done in {result.seconds:.1f} s")
    return EvalReport(merged, settings, results)


# ------------------------------------------------------------------------------------------ output


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _terminated(r: ModelResult) -> str:
    if r.termination_rate is None:
        return "—"
    done = sum(g.terminated for g in r.generations)
    return f"{r.termination_rate:.0%} ({done}/{len(r.generations)})"


_COLUMNS = (
    "model",
    "role",
    "perplexity",
    "ends its answer",
    "mean new tokens",
    "P(end) mean",
    "P(end) min",
    "KL(merged‖model)",
)


def _row(r: ModelResult) -> list[str]:
    return [
        r.name,
        r.role,
        _num(r.perplexity, "{:.3f}"),
        _terminated(r),
        _num(r.mean_new_tokens, "{:.1f}"),
        _num(r.end_prob_mean, "{:.3f}"),
        _num(r.end_prob_min, "{:.3f}"),
        _num(r.kl_mean, "{:.4f}"),
    ]


def _clip(text: str, chars: int) -> str:
    one_line = text.replace("\n", "⏎")
    return one_line if len(one_line) <= chars else one_line[: chars - 1] + "…"


def _shown(g: Generation, chars: int) -> str:
    return _clip(g.text, chars) + (" ⏹" if g.terminated else " [no end token]")


def results_table(report: EvalReport) -> Table:
    s = report.settings
    caption = f"end token {s['end_token']!r} (id {s['end_token_id']}); chat template: {s['chat_template_from']}"
    table = Table(
        title=Text(f"eval: {report.merged}"), title_justify="left", caption=Text(caption), caption_justify="left"
    )
    for col in _COLUMNS:
        table.add_column(col, justify="left" if col in ("model", "role") else "right")
    for r in report.models:
        table.add_row(*(Text(cell) for cell in _row(r)))  # Text: names and answers are not rich markup
    return table


def generations_table(report: EvalReport, show: int, chars: int) -> Table | None:
    if show <= 0 or not report.models or not report.models[0].generations:
        return None
    table = Table(
        title=f"generations (first {show}, greedy; ⏹ = ended its turn)", title_justify="left", show_lines=True
    )
    table.add_column("prompt")
    for r in report.models:
        table.add_column(Text(r.name))
    for i, g in enumerate(report.models[0].generations[:show]):
        table.add_row(Text(_clip(g.prompt, chars)), *(Text(_shown(r.generations[i], chars)) for r in report.models))
    return table


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def to_markdown(report: EvalReport, show: int, chars: int) -> str:
    s = report.settings
    lines = [f"# eval: {report.merged}", ""]
    lines += ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_md_cell(c) for c in _row(r)) + " |" for r in report.models]
    lines += [
        "",
        "- **perplexity**: exp of the token-weighted mean NLL of the text file over sliding windows "
        f"(max_length {s['max_length']}, stride {s['stride']}, {s['windows']} window(s), {s['text_tokens']} tokens "
        f"of {s['text']}).",
        "- **ends its answer**: share of the prompts whose greedy continuation emits one of the model's own stop "
        f"ids (generation_config eos) within {s['max_new_tokens']} new tokens.",
        f"- **P(end)**: probability of {s['end_token']!r} (id {s['end_token_id']}) right after the teacher-forced "
        "reference answer.",
        f"- **KL(merged‖model)**: nats per token over the first {s['kl_tokens']} scored positions of the text.",
        f"- chat template: {s['chat_template_from']}; tokenizer: {s['tokenizer']}; prompts: {s['prompts']} "
        f"({s['prompt_count']}).",
        "",
        "| model | stop ids | time (s) |",
        "|---|---|---|",
    ]
    lines += [f"| {_md_cell(r.name)} | {r.stop_ids} | {r.seconds:.1f} |" for r in report.models]
    if show > 0 and report.models and report.models[0].generations:
        lines += ["", f"## Generations (first {show}, greedy; ⏹ = ended its turn)", ""]
        for i, g in enumerate(report.models[0].generations[:show]):
            lines += [f"### {g.prompt}", ""]
            lines += [f"- **{r.name}**: {_md_cell(_shown(r.generations[i], chars))}" for r in report.models]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def report_paths(path: Path) -> tuple[Path | None, Path | None]:
    """(markdown, json) to write: PATH.md and PATH.json, or only the one whose suffix PATH has."""
    if path.suffix == ".md":
        return path, None
    if path.suffix == ".json":
        return None, path
    return path.with_name(path.name + ".md"), path.with_name(path.name + ".json")


def write_report(report: EvalReport, path: Path, show: int, chars: int) -> list[Path]:
    md, js = report_paths(path)
    written = []
    for target, text in (
        (md, lambda: to_markdown(report, show, chars)),
        (js, lambda: json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"),
    ):
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text(), encoding="utf-8")
            written.append(target)
    return written


# ------------------------------------------------------------------------------------------ command


class RichEvalProgress:
    """One transient rich bar per stage; notes are printed as dim lines."""

    def __init__(self, console: Console):
        self.console = console
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task: Any = None

    def start(self, label: str, total: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.bar.start()
        self.task = self.bar.add_task(label, total=total)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.bar.advance(self.task, n)

    def note(self, message: str) -> None:
        self.console.print(Text(message, style="dim"), highlight=False)

    def stop(self) -> None:
        self.bar.stop()


def eval_options(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(
        text=args.text,
        prompts=args.prompts,
        max_prompts=args.max_prompts,
        chat_template_from=args.chat_template_from,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        stride=args.stride,
        max_text_tokens=args.max_text_tokens,
        kl_tokens=args.kl_tokens,
        load=LoadOptions(
            device=args.device,
            dtype=args.dtype,
            max_ram=args.max_ram,
            max_vram=args.max_vram,
            offload_folder=args.offload_folder,
            trust_remote_code=args.trust_remote_code,
        ),
    )


@contextmanager
def transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own loading bars on or off for the duration (--quiet prints only errors); the
    setting is process-wide in transformers, so it is restored afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


# Below this many parameters a forward pass is a few small matmuls: one thread beats a thread pool, whose
# spinning workers made the demo's eval ~10x slower on a busy 2-core machine (and never faster on a quiet one).
SMALL_MODEL_PARAMS = 100_000_000


def default_eval_threads(models: Sequence[tuple[str, ModelSource]]) -> int | None:
    """1 when every model (``open_models``' result, headers only) is small, else None (torch's default)."""
    largest = max(sum(t.numel for t in src.tensors.values()) for _, src in models)
    return 1 if largest < SMALL_MODEL_PARAMS else None


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    """``mergekitlite eval OUT --against MODEL ...``."""
    options = eval_options(args)
    check_device(options.load)
    models = open_models(args.out, args.against)  # once: for the thread count and for run_eval
    threads = args.threads or default_eval_threads(models)
    if threads:
        torch.set_num_threads(threads)  # process-wide, like merge's --threads: this process is the command
    progress = RichEvalProgress(console) if not args.quiet else None
    try:
        with transformers_progress_bars(not args.quiet):
            report = run_eval(args.out, args.against, options, progress, models)
    finally:
        if progress is not None:
            progress.stop()
    console.print(results_table(report))
    gens = generations_table(report, args.show, args.show_chars)
    if gens is not None:
        console.print(gens)
    if args.report:
        for path in write_report(report, args.report, args.show, args.show_chars):
            console.print(f"wrote {path}", highlight=False)
    return 0
