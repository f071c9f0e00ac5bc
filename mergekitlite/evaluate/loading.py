"""Opening and loading the models: headers first (all problems at once), then one model at a time through
transformers, with accelerate's ``device_map="auto"`` and disk offload under a memory limit."""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mergekitlite.errors import MergekitliteError, one_line
from mergekitlite.evaluate.options import LoadOptions
from mergekitlite.sources import ModelSource, index_model, resolve_model_path


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


# Below this many parameters a forward pass is a few small matmuls: one thread beats a thread pool, whose
# spinning workers made the demo's eval ~10x slower on a busy 2-core machine (and never faster on a quiet one).
SMALL_MODEL_PARAMS = 100_000_000


def default_eval_threads(models: Sequence[tuple[str, ModelSource]]) -> int | None:
    """1 when every model (``open_models``' result, headers only) is small, else None (torch's default)."""
    largest = max(sum(t.numel for t in src.tensors.values()) for _, src in models)
    return 1 if largest < SMALL_MODEL_PARAMS else None


def set_threads(threads: int) -> None:
    """CPU threads of the forward passes: process-wide in torch, like merge's --threads (the process is the command)."""
    torch.set_num_threads(threads)


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


def _load_error(what: str, path: Path, exc: Exception) -> MergekitliteError:
    text = one_line(exc)
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
