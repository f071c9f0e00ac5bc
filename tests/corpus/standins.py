"""Tiny stand-ins for the models that the corpus configs name, so that a published config runs unchanged.

One module builds them for both sides: ``tests/test_corpus.py`` (our ``merge``) and
``bench/corpus_expect.py`` (mergekit, offline). For each config:

* every model reference is collected from every YAML document (``base_model``, ``models[].model``,
  ``slices[].sources[].model``, ``tokenizer_source``/``tokenizer.source``, ``model+lora`` pairs, and
  mergekit's ``model:`` prefix); names of earlier steps of a multi-document file are not models;
* the architecture comes from ``architectures.yaml`` (one reviewed line per config); the layer count is
  the largest ``layer_range`` end in the file (the models of one merge have the same depth), else 4;
* hub ids (``org/name``) go into a private Hugging Face cache laid out as the hub client writes it;
  relative paths (``./x``, ``model_a``, and Windows paths such as ``D:/x`` or ``E:\\x``, which are
  relative on POSIX) are created under the working directory; absolute paths are not created, so a
  config that names ``/home/alpha/...`` fails the same way on both sides;
* a ``+adapter`` becomes a PEFT-layout LoRA (``adapter_config.json`` + ``adapter_model.safetensors``);
* weights are seeded from the model's name: the same name gives the same bytes in every process;
* configs that build a union tokenizer get really different vocabularies per model (and so
  different embedding sizes); the others share one vocabulary.

Stand-in folders are cached per process by everything that determines their bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: builders

from builders import add_to_hub_cache, write_word_tokenizer

CORPUS = Path(__file__).resolve().parent
CONFIGS = CORPUS / "configs"
EXPECTED = CORPUS / "expected"
DEFAULT_LAYERS = 4
HIDDEN = 16

# Files of the output that belong to its tokenizer (compared as a set).
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "vocab.json",
        "merges.txt",
    }
)

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SHARED_WORDS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", *(f"w{i}" for i in range(27)))

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def config_paths() -> list[Path]:
    return sorted(CONFIGS.glob("*.yml"))


def architectures() -> dict[str, str]:
    return yaml.safe_load((CORPUS / "architectures.yaml").read_text(encoding="utf-8"))


def documents(path: Path) -> list[Any]:
    """The YAML documents of a config ([] when it does not parse: both tools then refuse it)."""
    try:
        return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except yaml.YAMLError:
        return []


def is_multi_document(path: Path) -> bool:
    return len(documents(path)) > 1


# ---------------------------------------------------------------- what a config references


@dataclass(frozen=True)
class Ref:
    """One input: a model and, for ``model+adapter``, the LoRA on top."""

    model: str
    lora: str | None = None


def _split_ref(value: str) -> Ref:
    value = value.strip()
    if value.startswith("model:"):
        value = value[len("model:") :]
    model, _, lora = value.partition("+")
    return Ref(model.partition("@")[0] if _HUB_ID.match(model.partition("@")[0]) else model, lora or None)


def _walk_refs(doc: Any) -> Iterator[str]:
    if not isinstance(doc, dict):
        return
    for key in ("base_model", "tokenizer_source"):
        if isinstance(doc.get(key), str):
            yield doc[key]
    tok = doc.get("tokenizer")
    if isinstance(tok, dict) and isinstance(tok.get("source"), str):
        yield tok["source"]
    for entry in doc.get("models") or []:
        if isinstance(entry, dict) and isinstance(entry.get("model"), str):
            yield entry["model"]
    for sl in doc.get("slices") or []:
        for src in (sl or {}).get("sources") or [] if isinstance(sl, dict) else []:
            if isinstance(src, dict) and isinstance(src.get("model"), str):
                yield src["model"]


def references(path: Path) -> set[Ref]:
    """Every model input of a config, without step names and tokenizer keywords."""
    docs = documents(path)
    steps = {d["name"] for d in docs if isinstance(d, dict) and isinstance(d.get("name"), str)}
    out = set()
    for doc in docs:
        for value in _walk_refs(doc):
            ref = _split_ref(value)
            if ref.model in steps or ref.model in ("union", "base") or not ref.model:
                continue
            out.add(ref)
    return out


def layer_count(path: Path) -> int:
    ends = [0]
    for doc in documents(path):
        for sl in (doc or {}).get("slices") or [] if isinstance(doc, dict) else []:
            for src in (sl or {}).get("sources") or [] if isinstance(sl, dict) else []:
                rng = src.get("layer_range") if isinstance(src, dict) else None
                if isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, int) for x in rng):
                    ends.append(rng[1])
    return max(ends) if max(ends) > 0 else DEFAULT_LAYERS


def wants_union_tokenizer(path: Path) -> bool:
    for doc in documents(path):
        if not isinstance(doc, dict):
            continue
        tok = doc.get("tokenizer")
        if doc.get("tokenizer_source") == "union" or (isinstance(tok, dict) and tok.get("source") == "union"):
            return True
    return False


def placement(name: str) -> str:
    """'hub' for ``org/name``, 'local' for a path relative to the working directory, 'absent' for an
    absolute path or a name no file system or hub could hold."""
    if name.startswith("/"):
        return "absent"
    if name.startswith(".") or "/" not in name or re.match(r"^[A-Za-z]:[\\/]", name):
        return "local"
    return "hub" if _HUB_ID.match(name) else "absent"


# ---------------------------------------------------------------- building


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:4], "little")


def _vocabulary(model: str, distinct: bool) -> list[str]:
    if not distinct:
        return list(SHARED_WORDS)
    s = _seed("vocab", model)
    return [*SHARED_WORDS, *(f"x{s % 97}_{i}" for i in range(1 + s % 4))]


def _hf_config(arch: str, layers: int, vocab: int) -> Any:
    from transformers import AutoConfig

    common = {
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": 32,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    extra: dict[str, dict[str, Any]] = {
        "mixtral": {"num_local_experts": 2, "num_experts_per_tok": 1},
        "phi3": {"pad_token_id": 0},
    }
    return AutoConfig.for_model(arch, **common, **extra.get(arch, {}))


def build_template(folder: Path, arch: str, layers: int, vocab: int) -> Path:
    """A checkpoint of ``arch`` as transformers writes it (tensor names, shapes, config.json); its
    values are not used."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_hf_config(arch, layers, vocab)).to(torch.bfloat16).save_pretrained(str(folder))
    return folder


def build_model(folder: Path, template: Path, model: str, vocab: list[str]) -> Path:
    """``template``'s files with values seeded from ``model``'s name, and a word-level tokenizer."""
    from safetensors import safe_open

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(_seed("values", model))
    for f in sorted(template.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata()
            shapes = {k: sf.get_slice(k).get_shape() for k in sf.keys()}  # noqa: SIM118
        tensors = {k: (torch.randn(v, generator=gen) * 0.05).to(torch.bfloat16) for k, v in sorted(shapes.items())}
        save_file(tensors, str(folder / f.name), metadata=meta)
    for f in template.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    chat = re.search(r"instruct|chat|-it\b", model, re.I) is not None
    write_word_tokenizer(folder, vocab, chat_template=CHATML if chat else None, eos="</s>")
    return folder


def build_lora(folder: Path, base: Path, adapter: str) -> Path:
    """A PEFT-layout LoRA (rank 2) on the attention projections of ``base``."""
    from safetensors import safe_open

    folder.mkdir(parents=True, exist_ok=True)
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    targets = [t for t in ("q_proj", "v_proj") if any(f".{t}.weight" in k for k in shapes)] or ["qkv_proj"]
    gen = torch.Generator().manual_seed(_seed("lora", adapter))
    tensors = {}
    for name, (rows, cols) in sorted((k, v) for k, v in shapes.items() if len(v) == 2):
        if not any(f".{t}.weight" in name for t in targets):
            continue
        stem = "base_model.model." + name[: -len(".weight")]
        tensors[stem + ".lora_A.weight"] = torch.randn(2, cols, generator=gen).to(torch.bfloat16)
        tensors[stem + ".lora_B.weight"] = torch.randn(rows, 2, generator=gen).to(torch.bfloat16)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": targets,
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return folder


class StandIns:
    """Builds stand-in folders once per (model, arch, layers, vocabulary kind) and lays them out for a
    config: a hub cache and a working directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple[Any, ...], Path] = {}

    def _once(self, key: tuple[Any, ...], build: Any) -> Path:
        if key not in self._built:
            folder = self.root / key[0] / hashlib.sha1(repr(key).encode()).hexdigest()[:16]
            build(folder)
            self._built[key] = folder
        return self._built[key]

    def _model(self, model: str, arch: str, layers: int, distinct: bool) -> Path:
        vocab = _vocabulary(model, distinct)
        template = self._once(
            ("templates", arch, layers, len(vocab)), lambda f: build_template(f, arch, layers, len(vocab))
        )
        return self._once(("models", model, arch, layers, distinct), lambda f: build_model(f, template, model, vocab))

    def _lora(self, base: Path, adapter: str) -> Path:
        return self._once(("loras", str(base), adapter), lambda f: build_lora(f, base, adapter))

    def lay_out(self, config: Path, hub_cache: Path, workdir: Path) -> dict[str, Path]:
        """Put every input of ``config`` where its reference resolves; returns {reference: folder}."""
        arch = architectures()[config.stem]
        layers, distinct = layer_count(config), wants_union_tokenizer(config)
        placed: dict[str, Path] = {}
        for ref in sorted(references(config), key=lambda r: (r.model, r.lora or "")):
            folder = self._model(ref.model, arch, layers, distinct)
            pairs = [(ref.model, folder)]
            if ref.lora:
                pairs.append((ref.lora, self._lora(folder, ref.lora)))
            for name, src in pairs:
                where = placement(name)
                if name in placed or where == "absent":
                    continue
                if where == "hub":
                    add_to_hub_cache(hub_cache, name, src)
                else:
                    dst = workdir / name
                    dst.mkdir(parents=True, exist_ok=True)
                    for f in src.iterdir():
                        (dst / f.name).write_bytes(f.read_bytes())
                placed[name] = src
        return placed


def fingerprint(placed: dict[str, Path]) -> str:
    """sha256 over the stand-ins' tensor names, shapes and dtypes: the expected files record it, so a
    change of builder or transformers version shows as a stale expectation, not as a wrong verdict."""
    from safetensors import safe_open

    h = hashlib.sha256()
    for name in sorted(placed):
        for f in sorted(placed[name].glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                for k in sorted(sf.keys()):
                    sl = sf.get_slice(k)
                    h.update(f"{name}|{k}|{sl.get_shape()}|{sl.get_dtype()}\n".encode())
    return h.hexdigest()


def describe_output(out: Path) -> dict[str, Any]:
    """What the expected files record about a merged model: tensors (shape, dtype), layer count and
    tokenizer files."""
    from safetensors import safe_open

    tensors: dict[str, list[Any]] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118
                sl = sf.get_slice(k)
                tensors[k] = [list(sl.get_shape()), sl.get_dtype()]
    cfg = json.loads((out / "config.json").read_text(encoding="utf-8")) if (out / "config.json").exists() else {}
    layers = cfg.get("num_hidden_layers", (cfg.get("text_config") or {}).get("num_hidden_layers"))
    return {
        "tensors": dict(sorted(tensors.items())),
        "num_hidden_layers": layers,
        "tokenizer_files": sorted(p.name for p in out.iterdir() if p.name in TOKENIZER_FILES),
    }


# ---------------------------------------------------------------- index: method and features of a config

# Top-level keys of mergekit's MergeConfiguration (0.1.x); others are misspelled or misplaced.
MERGEKIT_KEYS = frozenset(
    {
        "merge_method",
        "slices",
        "models",
        "modules",
        "input_model_paths",
        "parameters",
        "base_model",
        "dtype",
        "out_dtype",
        "tokenizer_source",
        "tokenizer",
        "chat_template",
        "name",
    }
)


def _duplicate_keys(text: str) -> list[str]:
    found: list[str] = []

    class Loader(yaml.SafeLoader):
        pass

    def construct(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[Any] = set()
        for k, _ in node.value:
            key = loader.construct_object(k)
            if key in seen:
                found.append(str(key))
            seen.add(key)
        return loader.construct_mapping(node)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct)
    with contextlib.suppress(yaml.YAMLError):
        list(yaml.load_all(text, Loader=Loader))  # a SafeLoader subclass
    return found


def method_of(path: Path) -> str:
    methods = [d.get("merge_method") for d in documents(path) if isinstance(d, dict)]
    return " + ".join(str(m) for m in methods if m) or "(unparsable)"


def features(path: Path) -> list[str]:
    """Short labels of what a config exercises, for the index."""
    text = path.read_text(encoding="utf-8")
    docs = documents(path)
    out: list[str] = []
    if not docs:
        out.append("YAML error")
    if len(docs) > 1:
        out.append("multi-document")
    dups = _duplicate_keys(text)
    if dups:
        out.append("duplicate keys (" + ", ".join(sorted(set(dups))) + ")")
    dicts = [d for d in docs if isinstance(d, dict)]
    unknown = sorted({k for d in dicts for k in d if k not in MERGEKIT_KEYS})
    if unknown:
        out.append("unknown keys (" + ", ".join(unknown) + ")")
    if any(d.get("slices") for d in dicts):
        out.append("slices")
    if re.search(r"value:\s*\[|weight:\s*\[|density:\s*\[|\bt:\s*\[", text):
        out.append("gradients")
    if "filter:" in text:
        out.append("filters")
    if wants_union_tokenizer(path):
        out.append("union tokenizer")
    if any(isinstance(d.get("tokenizer"), dict) for d in dicts):
        out.append("tokenizer block")
    elif any(d.get("tokenizer_source") not in (None, "union") for d in dicts):
        out.append("tokenizer_source")
    if any(r.lora for r in references(path)):
        out.append("model+lora")
    if any("chat_template" in d for d in dicts):
        out.append("chat_template")
    if any("out_dtype" in d for d in dicts):
        out.append("out_dtype")
    if any("modules" in d for d in dicts):
        out.append("modules")
    places = {placement(r.model) for r in references(path)}
    if "local" in places:
        out.append("local paths")
    if "absent" in places:
        out.append("missing inputs")
    return out
