"""Tiny deterministic checkpoints for tests, and the reference arithmetic the tests compare with.

Every builder writes a model folder the way published checkpoints look (``config.json`` plus
``model.safetensors``), from a seed, in well under a second. A *family* is a base model and
fine-tune-like children (the base plus small seeded perturbations), which is what task
arithmetic merges in practice. transformers is imported lazily: building a model from raw
tensors does not need it.

The reference helpers (``expected_weight``, ``ref_task_arithmetic``...) restate mergekit's rules
and the methods' formulas independently of the package, so a test compares the tool's output
with a value it did not produce.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# ---------------------------------------------------------------- writing and reading models


def write_safetensors_model(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None,
    *,
    filename: str = "model.safetensors",
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write ``tensors`` as one safetensors file plus ``config.json`` (and any extra files)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / filename), metadata={"format": "pt"})
    if config is not None:
        (path / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n", encoding="utf-8")
    for name, content in (extra_files or {}).items():
        target = path / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content, encoding="utf-8")
    return path


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (all ``*.safetensors`` files), read with safetensors itself."""
    path = Path(path)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                assert k not in out, f"{k} stored twice"
                out[k] = sf.get_tensor(k)
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))


def perturb(
    src: str | Path, dst: str | Path, seed: int, scale: float = 0.01, *, config_extra: Mapping[str, Any] | None = None
) -> Path:
    """A fine-tune-like child of ``src``: every float tensor plus seeded noise of std ``scale``
    (computed in float32, cast once to the tensor's dtype); other files are copied."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(src.glob("*.safetensors")):
        out = {}
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118
                t = sf.get_tensor(k)
                if t.is_floating_point():
                    noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * scale
                    t = (t.float() + noise).to(t.dtype)
                out[k] = t
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copyfile(f, dst / f.name)
    if config_extra:
        cfg = read_config(dst)
        cfg.update(config_extra)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return dst


def _save_hf_model(model: Any, path: Path, dtype: torch.dtype, config_extra: Mapping[str, Any] | None) -> Path:
    model = model.to(dtype)
    # Random init leaves norms at exactly 1 and biases at 0; give every tensor seeded values so
    # that no output tensor is trivially equal to its inputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p, dtype=torch.float32).to(dtype) * 0.1)
            del name
    model.save_pretrained(str(path))
    if config_extra:
        cfg = read_config(path)
        cfg.update(config_extra)
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return path


VOCAB = 64
HIDDEN = 16


def make_llama(
    path: str | Path,
    seed: int,
    tied: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    layers: int = 3,
    *,
    config_extra: Mapping[str, Any] | None = None,
) -> Path:
    """A tiny Llama (``model.layers.N...``); with ``tied`` the file has no ``lm_head.weight``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save_hf_model(LlamaForCausalLM(cfg), Path(path), dtype, config_extra)


def make_qwen2(
    path: str | Path,
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
    layers: int = 3,
    *,
    tied: bool = False,
    config_extra: Mapping[str, Any] | None = None,
) -> Path:
    """A tiny Qwen2 (``model.layers.N...`` with q/k/v biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _save_hf_model(Qwen2ForCausalLM(cfg), Path(path), dtype, config_extra)


def make_gpt2(
    path: str | Path,
    seed: int,
    dtype: torch.dtype = torch.float32,
    layers: int = 3,
    *,
    config_extra: Mapping[str, Any] | None = None,
) -> Path:
    """A tiny GPT-2 (``transformer.h.N...``, tied embeddings, no lm_head in the file)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=layers, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return _save_hf_model(GPT2LMHeadModel(cfg), Path(path), dtype, config_extra)


QWEN1_CODE_FILES = ("modeling_qwen.py", "configuration_qwen.py", "tokenization_qwen.py", "qwen.tiktoken")


def qwen1_code(donor: str, sentinel: Path) -> dict[str, str]:
    """Remote-code files of a Qwen v1 repo. Each records its donor, and executing any of the
    Python files would create ``sentinel``: tests assert it never exists."""
    boom = (
        "import pathlib\n"
        f"pathlib.Path({str(sentinel)!r}).write_text(__file__)\n"
        "raise RuntimeError('remote code must not be executed by a merge')\n"
    )
    return {
        "modeling_qwen.py": f"# donor: {donor}\n{boom}",
        "configuration_qwen.py": f"# donor: {donor}\n{boom}",
        "tokenization_qwen.py": f"# donor: {donor}\n{boom}",
        "qwen.tiktoken": f"IQ== 0\nIg== 1\n# donor: {donor}\n",
    }


def make_qwen1(
    path: str | Path,
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
    layers: int = 3,
    *,
    donor: str = "?",
    sentinel: Path | None = None,
) -> Path:
    """A Qwen v1 (Qwen-14B layout, trust_remote_code) checkpoint written directly: tensor names
    ``transformer.h.N.attn.c_attn.weight``, ``transformer.wte.weight``, ``lm_head.weight``..., an
    ``auto_map`` config and the repo's ``*.py`` / ``qwen.tiktoken`` files."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    h, ff = HIDDEN, 24
    tensors = {"transformer.wte.weight": r(VOCAB, h), "lm_head.weight": r(VOCAB, h), "transformer.ln_f.weight": r(h)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        tensors |= {
            p + "ln_1.weight": r(h),
            p + "attn.c_attn.weight": r(3 * h, h),
            p + "attn.c_attn.bias": r(3 * h),
            p + "attn.c_proj.weight": r(h, h),
            p + "ln_2.weight": r(h),
            p + "mlp.w1.weight": r(ff // 2, h),
            p + "mlp.w2.weight": r(ff // 2, h),
            p + "mlp.c_proj.weight": r(h, ff // 2),
        }
    config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "model_type": "qwen",
        "hidden_size": h,
        "intermediate_size": ff,
        "num_attention_heads": 2,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "torch_dtype": {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype],
        "mklt_donor": donor,
    }
    tok_cfg = {
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
        "tokenizer_class": "QWenTokenizer",
        "model_max_length": 64,
        "mklt_donor": donor,
    }
    files: dict[str, str | bytes] = {"tokenizer_config.json": json.dumps(tok_cfg, indent=2)}
    files |= qwen1_code(donor, sentinel or Path(path) / "EXECUTED")
    return write_safetensors_model(path, tensors, config, extra_files=files)


def make_family(
    root: str | Path, arch: str = "llama", seed: int = 0, *, children: int = 2, scale: float = 0.01, **kwargs: Any
) -> dict[str, Path]:
    """A base model and ``children`` fine-tune-like perturbations of it: {"base", "a", "b", ...}."""
    root = Path(root)
    makers = {"llama": make_llama, "qwen2": make_qwen2, "gpt2": make_gpt2, "qwen1": make_qwen1}
    base = makers[arch](root / "base", seed, **kwargs)
    out = {"base": base}
    for k in range(children):
        name = "abcdefgh"[k]
        out[name] = perturb(base, root / name, seed * 1000 + k + 1, scale)
    return out


def make_tokenizer(
    path: str | Path,
    chat_template: str | None = None,
    eos: str = "</s>",
    *,
    generation_eos_id: int | None = None,
    words: Sequence[str] = (),
) -> Path:
    """A tiny word-level fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) of ``VOCAB`` tokens that
    transformers loads with AutoTokenizer; optionally a ``generation_config.json``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>"]
    vocab_list = specials + [w for w in ("hello", "world", "user", "assistant", *words) if w not in specials]
    # As many tokens as the models have embedding rows, as real tokenizers do (a merge that names a tokenizer
    # gives the output one row per token).
    vocab_list += [f"t{i}" for i in range(len(vocab_list), VOCAB)]
    vocab = {w: i for i, w in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": eos,
        "unk_token": "<unk>",
        "model_max_length": 64,
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if generation_eos_id is not None:
        gen = {"bos_token_id": 1, "eos_token_id": generation_eos_id, "do_sample": True, "temperature": 0.7}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    return path


def write_word_tokenizer(
    folder: str | Path, texts: Sequence[str], *, chat_template: str | None = None, eos: str = "<|endoftext|>"
) -> Path:
    """A word-level fast tokenizer whose ids are the positions in ``texts``; the texts starting with
    "<" are special tokens. Writes ``tokenizer.json`` and ``tokenizer_config.json``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = Path(folder)
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(texts)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([t for t in texts if t.startswith("<")])
    tok.save(str(folder / "tokenizer.json"))
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "unk_token": "<unk>"}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return folder


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: offline, quiet, the hash cache from the current test."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"})
    env.update(extra)
    return env


def add_to_hub_cache(
    cache: str | Path,
    repo_id: str,
    folder: str | Path,
    *,
    commit: str | None = None,
    refs: Sequence[str] = ("main",),
    blobs: bool = True,
) -> Path:
    """Put the files of ``folder`` into a huggingface_hub cache at ``cache`` as if downloaded:
    ``models--org--name/refs/<ref>`` holds the commit hash, ``snapshots/<commit>/`` the files
    (with ``blobs``: symlinks to ``blobs/<sha256>`` as the hub client lays them out). Returns the
    snapshot folder."""
    import hashlib

    folder = Path(folder)
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        if blobs:
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
        else:
            shutil.copyfile(f, snap / f.name)
    return snap


# ---------------------------------------------------------------- mergekit's parameter rules, restated

_LAYER = re.compile(r"(?:^|\.)(\d+)\.")


def layer_of(name: str) -> int | None:
    """The layer index of a tensor name (first all-digit component), or None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def t_of(name: str, n_layers: int) -> Fraction:
    """mergekit's position of a tensor in the stack: layer i of n → i/(n-1); outside the layers → 0."""
    i = layer_of(name)
    if i is None:
        return Fraction(0)
    return Fraction(i, n_layers - 1) if n_layers > 1 else Fraction(1)


def gradient_at(values: Sequence[float], t: Fraction) -> float:
    """Linear interpolation of a gradient at t, computed exactly (Fractions) and rounded once."""
    vals = [Fraction(v) for v in values]
    pos = t * (len(vals) - 1)
    i = min(math.floor(pos), len(vals) - 1)
    j = min(i + 1, len(vals) - 1)
    frac = pos - i
    return float(vals[i] * (1 - frac) + vals[j] * frac)


def filter_matches(pattern: str | None, name: str) -> bool:
    """Plain strings are substrings (mergekit); '*'/None match everything."""
    if pattern is None or pattern == "*":
        return True
    assert not set("*?[") & set(pattern) and not pattern.startswith("re:"), "tests here use plain filters"
    return pattern in name


def expected_value(setting: Any, name: str, n_layers: int) -> float | None:
    """The value of one parameter setting for one tensor (None when no filter matches)."""
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting)
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for rule in setting:
            if filter_matches(rule.get("filter"), name):
                return expected_value(rule["value"], name, n_layers)
        return None
    if isinstance(setting, list):
        return gradient_at(setting, t_of(name, n_layers))
    raise TypeError(setting)


# ---------------------------------------------------------------- reference arithmetic (float32 by default)


def ref_task_arithmetic(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    lam: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """base + λ·Σ wᵢ(mᵢ − base), accumulated left to right in ``dtype``; normalize divides by Σw first."""
    b = base.to(dtype)
    total = (models[0].to(dtype) - b) * weights[0]
    for m, w in zip(models[1:], weights[1:], strict=True):
        total = total + (m.to(dtype) - b) * w
    if normalize and abs(sum(weights)) >= 1e-8:
        total = total / sum(weights)
    if lam != 1:
        total = total * lam
    return total + b


def ref_linear(
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    total = models[0].to(dtype) * weights[0]
    for m, w in zip(models[1:], weights[1:], strict=True):
        total = total + m.to(dtype) * w
    if normalize:
        total = total / sum(weights)
    return total


def ref_add_difference(
    base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float], *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """models[0] + Σᵢ≥₁ wᵢ(modelsᵢ − base)."""
    b = base.to(dtype)
    total = (models[1].to(dtype) - b) * weights[1]
    for m, w in zip(models[2:], weights[2:], strict=True):
        total = total + (m.to(dtype) - b) * w
    return total + models[0].to(dtype)


def text_position(text: str, needle: str, occurrence: int = 1, offset: int = 0) -> str:
    """'line:col' (1-based, as error messages write it) of the ``occurrence``-th ``needle`` in ``text``,
    plus ``offset`` columns."""
    pos = -1
    for _ in range(occurrence):
        pos = text.index(needle, pos + 1)
    pos += offset
    return f"{text.count(chr(10), 0, pos) + 1}:{pos - (text.rfind(chr(10), 0, pos) + 1) + 1}"


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Same dtype, shape and bits (NaN-safe), with a helpful message when not."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs()
        n = int((actual != expected).sum())
        raise AssertionError(f"{name}: {n}/{actual.numel()} elements differ, max |diff| {float(diff.max()):.3g}")


def assert_close_to_exact(
    actual: torch.Tensor, exact: torch.Tensor, name: str = "", ulps: float = 1.0, atol: float = 1e-7
) -> None:
    """``actual`` is within ``ulps`` units in the last place (of its dtype) of the float64
    ``exact``, plus ``atol`` for the float32 rounding of intermediate results near zero."""
    eps = torch.finfo(actual.dtype).eps
    err = (actual.double() - exact.double()).abs()
    bound = exact.double().abs() * eps * ulps + atol
    bad = err > bound
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())} element(s) off by more than {ulps} ulp, max err {float(err.max()):.3g}"
    )


def to_bf16_once(x: torch.Tensor) -> torch.Tensor:
    """float64 → bf16 with one correct rounding (nearest, ties to even), done on the float64 bits:
    torch's own ``.to(torch.bfloat16)`` goes through float32 and rounds twice. bf16 normal range only
    (the merged weights here are far from its limits)."""
    drop = 52 - 7  # float64 mantissa bits below bf16's 7
    bits = x.to(torch.float64).contiguous().view(torch.int64)
    bits = bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)  # carries into the exponent as needed
    bits = bits & ~((1 << drop) - 1)
    return bits.view(torch.float64).to(torch.float32).to(torch.bfloat16)  # both conversions now exact


def journal_done(partial: Path) -> set[str]:
    """Tensors a partial output's resume journal lists as written, read independently of the package."""
    try:
        lines = (partial / "mergekitlite-journal.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return set()
    done = set()
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break  # a torn last line from a kill
        if "done" in entry:
            done.add(entry["done"])
    return done


def assert_native_merge_equals_torch(recipe: Path, out: Path, monkeypatch: Any, module: Any, kernel: str) -> None:
    """Merge ``recipe`` twice: natively (``module.kernel`` must be called) and with ``--no-native`` (it must not
    be); every output tensor must have the same dtype and bytes."""
    from mergekitlite.api import MergeOptions, run_merge

    calls: list[int] = []
    real = getattr(module, kernel)
    monkeypatch.setattr(module, kernel, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    fast = run_merge(recipe, out / "native", MergeOptions(hash_inputs=False))
    assert calls, f"{module.__name__}.{kernel} did not run"
    n_native = len(calls)
    slow = run_merge(recipe, out / "torch", MergeOptions(hash_inputs=False, native=False))
    assert len(calls) == n_native, f"--no-native still called {module.__name__}.{kernel}"
    a, b = load_tensors(fast.output), load_tensors(slow.output)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name
