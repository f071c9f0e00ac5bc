"""Everything in the output besides the weights: config, tokenizer, chat template, generation
config, custom code, model card, provenance, and the input hashes they record.

Which model each file comes from is explicit: config.json and modelling code from the *config
donor* (``base_model``, else the first model, as in mergekit); tokenizer files, chat template and
generation_config.json from the *tokenizer donor* (``tokenizer_source``). In a chat-vector merge
the chat model must be the tokenizer donor: the pretrained base has no chat template and stops on
a different token, which is how merged chat models end up never stopping.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from mergekitlite import __version__
from mergekitlite.errors import CheckpointError, naming
from mergekitlite.io.identity import file_identity, identity
from mergekitlite.io.inputs import read_text_input
from mergekitlite.nonfinite import NonFinite
from mergekitlite.sources import ModelSource
from mergekitlite.taskgraph import Plan
from mergekitlite.tokens import builtin_chat_template, chat_template_of, read_token_info

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_GLOBS = ("*.tiktoken", "tokenization_*.py")
GENERATION_CONFIG = "generation_config.json"
_HASHED_SUFFIXES = (".json", ".model", ".tiktoken", ".txt", ".py", ".jinja", ".safetensors")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------- hashing
def default_cache_dir() -> Path:
    env = os.environ.get("MERGEKITLITE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergekitlite"


def files_to_hash(src: ModelSource) -> dict[str, Path]:
    """Label (the path in the model's folder; ``+adapter/NAME`` for a model+adapter's adapter files) → file."""
    files = set(src.weight_files)
    files.update(p for p in src.side_files() if p.suffix in _HASHED_SUFFIXES)
    out = {str(p.relative_to(src.path)): p for p in sorted(files)}
    adapter = getattr(src, "adapter", None)
    out.update({f"+adapter/{p.name}": p for p in (adapter.files if adapter is not None else [])})
    return out


def sha256_file(path: Path, cache: dict[str, str] | None = None) -> str:
    """sha256 of ``path`` (see :func:`hash_file`)."""
    return hash_file(path, cache)[1]


def hash_file(path: Path, cache: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(identity the file had while hashed, or None if it changed meanwhile; sha256). Hub-cache files
    are symlinks to blobs named by their sha256 (for LFS files), so those cost nothing; other results
    are cached by path and identity (device, inode, size, mtime and ctime: an in-place rewrite with
    the size and mtime put back still moves the ctime)."""
    real = Path(os.path.realpath(path))
    with open(real, "rb") as f:
        before = identity(os.fstat(f.fileno()))
        if _SHA256_RE.match(real.name) and real.parent.name == "blobs":
            return before, real.name
        key = f"{real}:{before}"
        if cache is not None and key in cache:
            return before, cache[key]
        h = hashlib.sha256()
        while block := f.read(8 * 1024 * 1024):
            h.update(block)
    digest = h.hexdigest()
    if file_identity(real) != before:
        return None, digest
    if cache is not None:
        cache[key] = digest
    return before, digest


@dataclass
class InputHasher:
    """Hashes every input file in a background thread while the merge runs. ``on_weights`` receives
    ``file → (identity while hashed, sha256)`` of the weight files as soon as they are all hashed
    (from the hashing thread)."""

    sources: Mapping[str, ModelSource]
    cache_file: Path | None
    on_weights: Callable[[dict[str, tuple[str, str]]], None] | None = None
    result: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: BaseException | None = None
    _thread: threading.Thread | None = None

    def start(self) -> InputHasher:
        self._thread = threading.Thread(target=self._run, name="mkl-hash", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            cache = self._read_cache()
            weights: dict[str, tuple[str, str]] = {}
            for ref, src in self.sources.items():
                files = set(src.input_files())
                digests = self.result[ref] = {}
                for label, p in files_to_hash(src).items():
                    ident, digest = hash_file(p, cache)
                    digests[label] = digest
                    if p in files and ident is not None:
                        weights[str(p)] = (ident, digest)
            if self.on_weights is not None:
                self.on_weights(weights)
            self._write_cache(cache)
        except BaseException as exc:  # reported by wait()
            self.error = exc

    def _read_cache(self) -> dict[str, str]:
        if not (self.cache_file and self.cache_file.is_file()):
            return {}
        try:
            cache = json.loads(self.cache_file.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return {}  # a cache is only a shortcut: a broken one is rebuilt
        return cache if isinstance(cache, dict) else {}

    def _write_cache(self, cache: dict[str, str]) -> None:
        if not self.cache_file:
            return
        tmp = self.cache_file.with_suffix(f".tmp{os.getpid()}")
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, self.cache_file)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self.notes.append(
                f"the input-hash cache {self.cache_file} could not be written ({exc.strerror}): the inputs will be "
                "hashed again next time (set MERGEKITLITE_CACHE to a writable folder)"
            )

    def wait(self) -> dict[str, dict[str, str]]:
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error
        return self.result


# ---------------------------------------------------------------- side files
def _copy(src: Path, dst_dir: Path) -> None:
    with naming(dst_dir / src.name):
        shutil.copyfile(src, dst_dir / src.name)


def _write_text(path: Path, text: str) -> None:
    with naming(path):
        path.write_text(text, encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file of a model folder, None when there is none. A broken one is an error, not
    an absent one: its settings (stop ids, chat template) would otherwise be silently lost."""
    if not os.path.lexists(path):
        return None
    try:
        data = json.loads(read_text_input(path))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc}); fix or remove it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a JSON {type(data).__name__}, not an object; fix or remove it")
    return data


def _resolve_chat_template(plan: Plan) -> str | None:
    wanted = plan.recipe.chat_template
    if wanted is None:
        return None
    if wanted == "auto":
        found = [t.strip() for src in plan.sources.values() if (t := chat_template_of(src.path))]
        return Counter(found).most_common(1)[0][0] if found else None
    return builtin_chat_template(wanted) or wanted  # the recipe loader has checked it is one of the two


@dataclass
class SideFiles:
    """Where each non-weight file of the output came from (the model card lists this)."""

    origins: dict[str, str] = field(default_factory=dict)
    eos_ids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_side_files(plan: Plan, out: Path, *, copy_tokenizer: bool = True) -> SideFiles:
    """Write config.json, tokenizer files, chat template, generation config and code. Without
    ``copy_tokenizer`` (mergekit's --no-copy-tokenizer) no tokenizer file or chat template is written;
    the stop ids in the configs still come from the tokenizer donor."""
    result = SideFiles()
    cfg_src = plan.sources[plan.config_donor]
    tok_src = plan.sources[plan.tokenizer_donor]
    out_cfg = dict(plan.out_config)
    result.origins["config.json"] = cfg_src.ref

    # Custom modelling code (trust_remote_code models such as Qwen-14B) goes with the config.
    code = [p for p in sorted(cfg_src.path.glob("*.py")) if not p.name.startswith("tokenization_")]
    for p in code:
        _copy(p, out)
    if code:
        result.origins["modelling code (" + ", ".join(p.name for p in code) + ")"] = cfg_src.ref

    copied: list[str] = []
    rebuilt = plan.vocab.tokenizer if plan.vocab is not None else None
    if copy_tokenizer and rebuilt is not None:
        # The output's vocabulary is not the donor's (a union, or tokens added): write the tokenizer made for it.
        rebuilt.save_pretrained(str(out))
        what = "union of every model's" if plan.vocab.source == "union" else f"{tok_src.ref}'s plus added tokens"
        result.origins["tokenizer (made for the output: " + what + ")"] = tok_src.ref
    elif copy_tokenizer:
        copied += [name for name in TOKENIZER_FILES if (tok_src.path / name).is_file()]
        copied += [p.name for pattern in TOKENIZER_GLOBS for p in sorted(tok_src.path.glob(pattern))]
    else:
        result.notes.append("no tokenizer was written (--no-copy-tokenizer): add one before loading the model")
    for name in copied:
        _copy(tok_src.path / name, out)
    if copied:
        result.origins["tokenizer (" + ", ".join(copied) + ")"] = tok_src.ref
    elif copy_tokenizer and rebuilt is None:
        result.notes.append(f"{tok_src.ref!r} has no tokenizer files: the output has no tokenizer")

    template = _resolve_chat_template(plan) if copy_tokenizer else None
    if template is not None:
        _set_chat_template(out, template)
        result.origins["chat template"] = f"recipe (chat_template: {plan.recipe.chat_template})"
    elif chat_template_of(out) is not None:
        result.origins["chat template"] = tok_src.ref

    # Stop on every end-of-turn / end-of-text id of the donors, so that a chat model made from a
    # pretrained base stops at its turn end and at end of text alike.
    out_tokens = read_token_info(out)
    eos = unique_ids(
        read_token_info(tok_src.path).end_ids() + out_tokens.end_ids() + read_token_info(cfg_src.path).end_ids()
    )
    gen_src = tok_src if (tok_src.path / GENERATION_CONFIG).is_file() else cfg_src
    gen = _read_json(gen_src.path / GENERATION_CONFIG)
    if gen is not None or eos:
        gen = dict(gen or {})
        if eos:
            gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        for key in ("bos_token_id", "pad_token_id"):
            if gen.get(key) is None and out_cfg.get(key) is not None:
                gen[key] = out_cfg[key]
        _write_text(out / GENERATION_CONFIG, json.dumps(gen, indent=2) + "\n")
        origin = gen_src.ref if (gen_src.path / GENERATION_CONFIG).is_file() else "created"
        result.origins[GENERATION_CONFIG] = f"{origin}; eos_token_id = union of the donors' end ids {eos}"
    if eos:
        out_cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    result.eos_ids = eos

    for end in read_token_info(out).turn_end_tokens():
        tid = out_tokens.id_of(end)
        if tid is not None and tid not in eos:
            result.notes.append(
                f"the output's chat template ends turns with {end!r} (id {tid}), which is not an eos id"
            )
    _write_text(out / "config.json", json.dumps(out_cfg, indent=2, ensure_ascii=False) + "\n")

    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in plan.tasks)},
            "weight_map": {t.name: plan.shard_of[t.name] for t in plan.tasks},
        }
        _write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    return result


def unique_ids(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(ids))


def _set_chat_template(out: Path, template: str) -> None:
    jinja = out / "chat_template.jinja"
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path)
    if tok_cfg is not None and "chat_template" in tok_cfg and not jinja.exists():
        tok_cfg["chat_template"] = template
        _write_text(tok_cfg_path, json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
        return
    (out / "chat_template.json").unlink(missing_ok=True)
    _write_text(jinja, template)
    if tok_cfg is not None and "chat_template" in tok_cfg:
        del tok_cfg["chat_template"]
        _write_text(tok_cfg_path, json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- card and provenance
def _torch_version() -> str:
    """The installed torch's version, from its metadata: a merge that never computes with torch does not
    import it just to name it."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def provenance(plan: Plan, hashes: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    return {
        "mergekitlite": __version__,
        "torch": _torch_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "merge_method": plan.recipe.merge_method,
        "compute_dtype": plan.compute_dtype,
        "recipe_sha256": hashlib.sha256(plan.loaded.text.encode()).hexdigest(),
        "plan_fingerprint": plan.fingerprint(),
        "config_donor": plan.config_donor,
        "tokenizer_donor": plan.tokenizer_donor,
        "inputs": {
            ref: {"path": str(src.path), "from_hub": src.from_hub, "files": dict(hashes.get(ref, {}))}
            | ({"adapter": str(adapter.path)} if (adapter := getattr(src, "adapter", None)) is not None else {})
            for ref, src in plan.sources.items()
        },
    }


def _card(plan: Plan, prov: Mapping[str, Any], name: str, recipe_text: str, side: SideFiles | None) -> str:
    recipe = plan.recipe
    bases = [ref for ref, src in plan.sources.items() if src.from_hub]
    front: dict[str, Any] = {"library_name": "transformers", "tags": ["merge", "mergekit", "mergekitlite"]}
    if bases:
        front["base_model"] = bases
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", ""]
    lines += [f"# {recipe.name or name}", ""]
    lines += [
        f"This model was made with [mergekitlite](https://github.com/) {__version__} by merging with "
        f"**{recipe.merge_method}**, computed in {plan.compute_dtype}.",
        "",
        "## Inputs",
        "",
        "| model | role | files (sha256) |",
        "|---|---|---|",
    ]
    for ref, entry in prov["inputs"].items():
        roles = []
        if ref == recipe.base_model:
            roles.append("base")
        if ref == plan.config_donor:
            roles.append("config")
        if ref == plan.tokenizer_donor:
            roles.append("tokenizer, chat template, generation config")
        files = "<br>".join(f"`{f}` `{h}`" for f, h in entry["files"].items()) or "(not hashed)"
        lines.append(f"| `{ref}` | {', '.join(roles) or 'merged'} | {files} |")
    if side is not None and side.origins:
        lines += ["", "## Where each file came from", "", "| file | from |", "|---|---|"]
        lines += [f"| {what} | `{origin}` |" for what, origin in side.origins.items()]
        lines.append("| model*.safetensors | merged |")
    lines += [
        "",
        "## Recipe",
        "",
        "Reproduce with `merge mergekit_config.yml` (mergekitlite) or "
        "`mergekit-yaml mergekit_config.yml OUT` (mergekit).",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card(
    plan: Plan,
    out: Path,
    hashes: Mapping[str, Mapping[str, str]],
    name: str,
    recipe_text: str | None = None,
    side: SideFiles | None = None,
    nonfinite: Mapping[str, NonFinite] | None = None,
) -> None:
    """Model card, provenance JSON and the recipe (``recipe_text``: all steps of a multi-step recipe).
    ``nonfinite``: the tensors that read or wrote NaN/±inf, recorded with their counts."""
    text = recipe_text or plan.loaded.text
    prov = provenance(plan, hashes)
    if side is not None:
        prov["files_from"] = side.origins
        prov["eos_token_id"] = side.eos_ids
    # Always present, so that an empty object says the merge was checked and found nothing.
    order = {t.name: i for i, t in enumerate(plan.tasks)}
    prov["nonfinite"] = {
        name: found.to_json()
        for name, found in sorted((nonfinite or {}).items(), key=lambda item: order.get(item[0], len(order)))
        if found
    }
    _write_text(out / "mergekitlite.json", json.dumps(prov, indent=2, ensure_ascii=False) + "\n")
    _write_text(out / "mergekit_config.yml", text)
    _write_text(out / "README.md", _card(plan, prov, name, text, side))
