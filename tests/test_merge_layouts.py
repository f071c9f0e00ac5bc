"""End-to-end merges of tiny checkpoints in every supported layout, checked tensor by tensor.

Each test builds seeded models, runs the merge through the public API, and compares every
output tensor with a float32 reference computed here from the loaded inputs (in the method's
order of operations, cast once): bitwise. A float64 reference checks the result is also
within an ulp of the exact value. Expected per-tensor parameters are resolved here from
mergekit's rules (builders.expected_value), not taken from the tool.
"""

from __future__ import annotations

import json
from pathlib import Path

import builders
import pytest
import torch
from builders import (
    assert_bitwise,
    assert_close_to_exact,
    expected_value,
    load_tensors,
    read_config,
    ref_add_difference,
    ref_linear,
    ref_task_arithmetic,
    to_bf16_once,
)
from safetensors import safe_open

from mergekitlite import MergeOptions, run_merge

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight")


def tensor_of(tensors: dict[str, torch.Tensor], name: str, tied: bool) -> torch.Tensor:
    """A model's tensor ``name``; a tied model without lm_head uses its input embedding."""
    if name in tensors:
        return tensors[name]
    assert tied and name.endswith("lm_head.weight"), f"model has no {name}"
    return next(tensors[e] for e in EMBEDDINGS if e in tensors)


def yaml_setting(value: object) -> str:
    return json.dumps(value)  # JSON is YAML: exact numbers and lists, no formatting surprises


def check_task_arithmetic(
    out: Path,
    base: Path,
    models: list[Path],
    settings: list[object],
    *,
    n_layers: int,
    out_dtype: torch.dtype,
    normalize: bool = False,
    lam: float = 1.0,
    tied: tuple[bool, ...] | None = None,
) -> int:
    """Compare every tensor of ``out`` with the task-arithmetic reference; returns how many."""
    result = load_tensors(out)
    base_t = load_tensors(base)
    model_t = [load_tensors(m) for m in models]
    tied = tied or (False,) * (len(models) + 1)
    assert set(result) == set(base_t), "the output has exactly the base model's tensors"
    for name, actual in result.items():
        weights = [expected_value(s, name, n_layers) for s in settings]
        assert None not in weights, f"test bug: no weight for {name}"
        b = tensor_of(base_t, name, tied[0])
        ms = [tensor_of(t, name, tb) for t, tb in zip(model_t, tied[1:], strict=True)]
        expected = ref_task_arithmetic(b, ms, weights, normalize=normalize, lam=lam).to(out_dtype)
        assert_bitwise(actual, expected, name)
        exact = ref_task_arithmetic(b, ms, weights, normalize=normalize, lam=lam, dtype=torch.float64)
        assert_close_to_exact(actual, exact, name)
    return len(result)


def ta_recipe(
    base: Path,
    models: list[Path],
    settings: list[object],
    *,
    dtype: str | None = None,
    extra: str = "",
    global_params: str = "",
) -> str:
    lines = ["merge_method: task_arithmetic", f"base_model: {base}", "models:"]
    for m, s in zip(models, settings, strict=True):
        lines += [f"  - model: {m}", "    parameters:", f"      weight: {yaml_setting(s)}"]
    if dtype:
        lines.append(f"dtype: {dtype}")
    if global_params:
        lines += ["parameters:", global_params]
    return "\n".join(lines) + "\n" + extra


# A per-layer gradient for the first model, a filtered rule for the second; dyadic values so that
# every interpolated weight is exact and the reference needs no rounding assumptions.
GRADIENT = [0.25, 0.75, 0.5]


def filtered(attn: str) -> list[dict[str, object]]:
    return [{"filter": attn, "value": 0.5}, {"value": 1.25}]


@pytest.mark.parametrize(
    ("family", "attn", "layers", "dtype", "params"),
    [
        ("llama_family", "self_attn", 3, "bfloat16", ""),
        ("llama_tied_family", "self_attn", 5, "bfloat16", ""),
        ("qwen2_family", "self_attn", 4, "float16", "  normalize: true\n  lambda: 0.75"),
        ("gpt2_family", "attn", 3, "float32", "  lambda: 1.5"),
    ],
    ids=["llama", "llama-tied", "qwen2", "gpt2"],
)
def test_task_arithmetic_layouts(request, tmp_path, family, attn, layers, dtype, params):
    fam = request.getfixturevalue(family)
    settings = [GRADIENT, filtered(attn)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ta_recipe(fam["base"], [fam["a"], fam["b"]], settings, dtype=dtype, global_params=params))
    out = tmp_path / "out"
    result = run_merge(recipe, out)
    assert result.output == out.resolve() or result.output == out
    normalize = "normalize: true" in params
    lam = 0.75 if "0.75" in params else 1.5 if "1.5" in params else 1.0
    n = check_task_arithmetic(
        out,
        fam["base"],
        [fam["a"], fam["b"]],
        settings,
        n_layers=layers,
        out_dtype=DTYPES[dtype],
        normalize=normalize,
        lam=lam,
    )
    assert n == len(load_tensors(fam["base"]))
    cfg = read_config(out)
    assert cfg["dtype"] == dtype and "torch_dtype" not in cfg
    assert cfg["num_hidden_layers" if "gpt2" not in family else "n_layer"] == layers


def test_tied_output_has_no_lm_head(llama_tied_family, tmp_path):
    fam = llama_tied_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ta_recipe(fam["base"], [fam["a"], fam["b"]], [1.0, 1.0]))
    run_merge(recipe, tmp_path / "out")
    names = set(load_tensors(tmp_path / "out"))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert read_config(tmp_path / "out")["tie_word_embeddings"] is True


def _untie(src: Path, dst: Path, *, tied: bool) -> Path:
    """A copy of ``src`` with (tied=False) an lm_head / (tied=True) without one, config to match."""
    tensors = load_tensors(src)
    if tied:
        tensors.pop("lm_head.weight")
    else:
        gen = torch.Generator().manual_seed(99)
        emb = tensors["model.embed_tokens.weight"]
        tensors["lm_head.weight"] = (emb.float() + torch.randn(emb.shape, generator=gen) * 0.01).to(emb.dtype)
    cfg = read_config(src)
    cfg["tie_word_embeddings"] = tied
    return builders.write_safetensors_model(dst, tensors, cfg)


def test_mixed_tied_untied_uses_embedding_for_missing_lm_head(llama_family, tmp_path):
    """Base untied; model 'a' is tied (no lm_head in its file): its embedding stands in for lm_head."""
    fam = llama_family
    a_tied = _untie(fam["a"], tmp_path / "a-tied", tied=True)
    settings = [0.5, 1.25]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ta_recipe(fam["base"], [a_tied, fam["b"]], settings))
    run_merge(recipe, tmp_path / "out")
    check_task_arithmetic(
        tmp_path / "out",
        fam["base"],
        [a_tied, fam["b"]],
        settings,
        n_layers=3,
        out_dtype=torch.bfloat16,
        tied=(False, True, False),
    )
    # The lm_head really came from a's embedding (the reference would be the same otherwise only by accident).
    a = load_tensors(a_tied)
    assert "lm_head.weight" not in a
    out = load_tensors(tmp_path / "out")
    base, b = load_tensors(fam["base"]), load_tensors(fam["b"])
    exp = ref_task_arithmetic(base["lm_head.weight"], [a["model.embed_tokens.weight"], b["lm_head.weight"]], settings)
    assert_bitwise(out["lm_head.weight"], exp.to(torch.bfloat16), "lm_head.weight")


def test_mixed_tied_base_untied_model_warns(llama_tied_family, tmp_path):
    """Base tied, a model with its own lm_head: the output follows the base (no lm_head) and says so."""
    fam = llama_tied_family
    b_untied = _untie(fam["b"], tmp_path / "b-untied", tied=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ta_recipe(fam["base"], [fam["a"], b_untied], [1.0, 1.0]))
    result = run_merge(recipe, tmp_path / "out")
    assert "lm_head.weight" not in load_tensors(tmp_path / "out")
    assert any("lm_head.weight" in w and "b-untied" in w for w in result.plan.warnings), result.plan.warnings


def test_a_tensor_the_base_lacks_is_never_dropped_silently(llama_family, tmp_path, capsys):
    """The base lost its lm_head (its config still says untied): the output would load with lm_head MISSING.
    The merge stops and says how to resolve it; with the rule it names, the output loads with no missing or
    unexpected keys and holds the taken tensor."""
    from transformers import AutoModelForCausalLM

    from mergekitlite.cli import merge_main

    fam = llama_family
    base = load_tensors(fam["base"])
    del base["lm_head.weight"]
    broken = builders.write_safetensors_model(tmp_path / "base", base, read_config(fam["base"]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ta_recipe(broken, [fam["a"], fam["b"]], [1.0, 1.0]))
    assert merge_main([str(recipe), str(tmp_path / "out"), "--no-hash"]) == 2
    err = capsys.readouterr().err
    assert "'lm_head.weight' is in" in err and "take:" in err and "drop: true" in err
    assert not (tmp_path / "out").exists()

    recipe.write_text(recipe.read_text() + f"rules:\n  - match: lm_head.weight\n    take: {fam['a']}\n")
    assert merge_main([str(recipe), str(tmp_path / "out"), "--no-hash"]) == 0
    assert_bitwise(load_tensors(tmp_path / "out")["lm_head.weight"], load_tensors(fam["a"])["lm_head.weight"])
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


# ---------------------------------------------------------------- Qwen v1 (remote-code layout)


@pytest.fixture(scope="module")
def qwen1_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen1")
    sentinel = root / "REMOTE-CODE-EXECUTED"
    base = builders.make_qwen1(root / "base", 5, donor="base", sentinel=sentinel)
    fam = {"base": base, "sentinel": sentinel}
    for k, name in enumerate(("a", "b")):
        child = builders.perturb(base, root / name, 500 + k, config_extra={"mklt_donor": name})
        for fname, text in builders.qwen1_code(name, sentinel).items():
            (child / fname).write_text(text)
        tok_cfg = json.loads((child / "tokenizer_config.json").read_text())
        tok_cfg["mklt_donor"] = name
        (child / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
        fam[name] = child
    return fam


def test_qwen1_layout_merges_without_running_code(qwen1_family, tmp_path):
    fam = qwen1_family
    settings = [GRADIENT, filtered("attn")]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        ta_recipe(fam["base"], [fam["a"], fam["b"]], settings, dtype="float16", extra=f"tokenizer_source: {fam['b']}\n")
    )
    out = tmp_path / "out"
    run_merge(recipe, out)
    check_task_arithmetic(out, fam["base"], [fam["a"], fam["b"]], settings, n_layers=3, out_dtype=torch.float16)
    assert {
        "transformer.h.2.attn.c_attn.weight",
        "transformer.wte.weight",
        "lm_head.weight",
        "transformer.ln_f.weight",
    } <= set(load_tensors(out))

    # Modelling code and config from the config donor (base), tokenizer code/files from tokenizer_source.
    for fname, donor in [
        ("modeling_qwen.py", "base"),
        ("configuration_qwen.py", "base"),
        ("tokenization_qwen.py", "b"),
        ("qwen.tiktoken", "b"),
    ]:
        assert (out / fname).read_text() == (fam[donor] / fname).read_text(), fname
    assert json.loads((out / "tokenizer_config.json").read_text())["mklt_donor"] == "b"
    cfg = read_config(out)
    assert cfg["mklt_donor"] == "base"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert cfg["torch_dtype"] == "float16" and "dtype" not in cfg
    assert not fam["sentinel"].exists(), "a model's remote code was executed"


# ---------------------------------------------------------------- the outputs load in transformers


@pytest.mark.parametrize(
    ("family", "out_dtype"),
    [
        ("llama_family", "float32"),
        ("llama_tied_family", "bfloat16"),
        ("qwen2_family", "bfloat16"),
        ("gpt2_family", "float16"),
    ],
)
def test_output_loads_in_transformers(request, tmp_path, family, out_dtype):
    from transformers import AutoModelForCausalLM

    fam = request.getfixturevalue(family)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ta_recipe(fam["base"], [fam["a"], fam["b"]], [0.5, 0.5], extra=f"out_dtype: {out_dtype}\n"))
    out = tmp_path / "out"
    run_merge(recipe, out)
    cfg = read_config(out)
    assert cfg["dtype"] == out_dtype and "torch_dtype" not in cfg

    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == DTYPES[out_dtype]
    merged = load_tensors(out)
    state = model.state_dict()
    for name, t in merged.items():
        assert torch.equal(state[name], t), f"{name} loaded differently"
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 5, builders.VOCAB)
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------- other methods, end to end


def _models_recipe(
    method: str,
    models: list[tuple[Path, object]],
    *,
    base: Path | None = None,
    weight_key: str = "weight",
    extra: str = "",
) -> str:
    lines = [f"merge_method: {method}"] + ([f"base_model: {base}"] if base else []) + ["models:"]
    for m, w in models:
        lines.append(f"  - model: {m}")
        if w is not None:
            lines += ["    parameters:", f"      {weight_key}: {yaml_setting(w)}"]
    return "\n".join(lines) + "\n" + extra


@pytest.mark.parametrize("normalize", [None, True, False])
def test_linear(llama_family, tmp_path, normalize):
    fam = llama_family
    weights = [0.3, 0.5, 0.7]  # not dyadic: the float32 reference multiplies exactly as torch does
    extra = "" if normalize is None else f"parameters:\n  normalize: {str(normalize).lower()}\n"
    recipe = tmp_path / "r.yaml"
    models = list(zip([fam["base"], fam["a"], fam["b"]], weights, strict=True))
    recipe.write_text(_models_recipe("linear", models, extra=extra))
    run_merge(recipe, tmp_path / "out")
    out = load_tensors(tmp_path / "out")
    ins = [load_tensors(fam[k]) for k in ("base", "a", "b")]
    norm = normalize is not False  # mergekit's default is normalize: true
    assert set(out) == set(ins[0])
    for name, actual in out.items():
        ms = [t[name] for t in ins]
        assert_bitwise(actual, ref_linear(ms, weights, normalize=norm).to(torch.bfloat16), name)
        assert_close_to_exact(actual, ref_linear(ms, weights, normalize=norm, dtype=torch.float64), name)


def test_passthrough_with_scale(llama_family, tmp_path):
    fam = llama_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        _models_recipe(
            "passthrough",
            [(fam["a"], None)],
            extra="parameters:\n  scale: 0.5\n"
            "rules:\n  - match: norm\n    method: passthrough\n"
            "    parameters:\n      scale: 3.0\n",
        )
    )
    run_merge(recipe, tmp_path / "out")
    out, a = load_tensors(tmp_path / "out"), load_tensors(fam["a"])
    assert set(out) == set(a)
    for name, actual in out.items():
        scale = 3.0 if "norm" in name else 0.5
        assert_bitwise(actual, (a[name].float() * scale).to(torch.bfloat16), name)


def test_passthrough_plain_copy_is_bit_exact(gpt2_family, tmp_path):
    fam = gpt2_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_models_recipe("passthrough", [(fam["b"], None)]))
    run_merge(recipe, tmp_path / "out")
    out, b = load_tensors(tmp_path / "out"), load_tensors(fam["b"])
    assert set(out) == set(b)
    for name in b:
        assert_bitwise(out[name], b[name], name)


@pytest.mark.parametrize("weights", [None, [0.5, 0.75]])
def test_add_difference(llama_family, tmp_path, weights):
    """models[0] + Σᵢ≥₁ wᵢ(modelsᵢ − base); weight defaults to 1."""
    fam = llama_family
    c = builders.perturb(fam["base"], tmp_path / "c", 77)
    ws = weights or [None, None]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        _models_recipe(
            "add_difference",
            [(fam["a"], ws[0]), (fam["b"], ws[1]), (c, 1.5)],
            base=fam["base"],
            extra="dtype: bfloat16\n",
        )
    )
    run_merge(recipe, tmp_path / "out")
    out = load_tensors(tmp_path / "out")
    base, a, b, cc = (load_tensors(p) for p in (fam["base"], fam["a"], fam["b"], c))
    w = [1.0, (weights or [1.0, 1.0])[1], 1.5]
    for name, actual in out.items():
        ms = [a[name], b[name], cc[name]]
        assert_bitwise(actual, ref_add_difference(base[name], ms, w).to(torch.bfloat16), name)
        assert_close_to_exact(actual, ref_add_difference(base[name], ms, w, dtype=torch.float64), name)


def test_rules_take_and_method_override(llama_family, tmp_path):
    fam = llama_family
    settings = [0.5, 0.75]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        ta_recipe(
            fam["base"],
            [fam["a"], fam["b"]],
            settings,
            extra=(
                "rules:\n"
                f"  - match: embed_tokens\n    take: {fam['b']}\n"
                "  - match: '*.mlp.*'\n    method: linear\n    parameters:\n      weight: 1.0\n"
                f"  - match: lm_head\n    take: {fam['base']}\n"
            ),
        )
    )
    result = run_merge(recipe, tmp_path / "out")
    out = load_tensors(tmp_path / "out")
    base, a, b = (load_tensors(fam[k]) for k in ("base", "a", "b"))
    seen = {"take": 0, "linear": 0, "ta": 0}
    for name, actual in out.items():
        if "embed_tokens" in name:
            assert_bitwise(actual, b[name], name)
            seen["take"] += 1
        elif name == "lm_head.weight":
            assert_bitwise(actual, base[name], name)
        elif ".mlp." in name:
            # linear takes no base, so (as in mergekit, which adds base_model to every method's
            # inputs) the base model is one more averaged input, after the listed models.
            exp = ref_linear([a[name], b[name], base[name]], [1.0, 1.0, 1.0]).to(torch.bfloat16)
            assert_bitwise(actual, exp, name)
            seen["linear"] += 1
        else:
            exp = ref_task_arithmetic(base[name], [a[name], b[name]], settings).to(torch.bfloat16)
            assert_bitwise(actual, exp, name)
            seen["ta"] += 1
    assert seen == {"take": 1, "linear": 9, "ta": 3 * 6 + 1}
    whys = {t.name: t.why for t in result.plan.tasks}
    assert "rules[0]" in whys["model.embed_tokens.weight"]


@pytest.mark.parametrize(
    ("out_dtype", "compute_dtype"),
    [("float16", "float32"), ("float32", "float32"), ("float32", "float64"), ("bfloat16", "float64")],
)
def test_out_dtype_and_compute_dtype(llama_family, tmp_path, out_dtype, compute_dtype):
    fam = llama_family
    settings = [0.3, 0.6]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        ta_recipe(
            fam["base"],
            [fam["a"], fam["b"]],
            settings,
            dtype="bfloat16",
            extra=f"out_dtype: {out_dtype}\ncompute_dtype: {compute_dtype}\n",
        )
    )
    run_merge(recipe, tmp_path / "out")
    out = load_tensors(tmp_path / "out")
    base, a, b = (load_tensors(fam[k]) for k in ("base", "a", "b"))
    cd = {"float32": torch.float32, "float64": torch.float64}[compute_dtype]
    for name, actual in out.items():
        exact = ref_task_arithmetic(base[name], [a[name], b[name]], settings, dtype=cd)
        # A float64 result is cast once, correctly rounded (not through float32, as torch's .to would).
        exp = to_bf16_once(exact) if (cd, out_dtype) == (torch.float64, "bfloat16") else exact.to(DTYPES[out_dtype])
        assert_bitwise(actual, exp, name)
    assert read_config(tmp_path / "out")["dtype"] == out_dtype


def test_compute_dtype_option_overrides_recipe(llama_family, tmp_path):
    fam = llama_family
    settings = [0.3, 0.6]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ta_recipe(fam["base"], [fam["a"], fam["b"]], settings, extra="out_dtype: float32\n"))
    result = run_merge(recipe, tmp_path / "out", MergeOptions(compute_dtype="float64"))
    assert result.plan.compute_dtype == "float64"
    out = load_tensors(tmp_path / "out")
    base, a, b = (load_tensors(fam[k]) for k in ("base", "a", "b"))
    differs = 0
    for name, actual in out.items():
        exp64 = ref_task_arithmetic(base[name], [a[name], b[name]], settings, dtype=torch.float64)
        assert_bitwise(actual, exp64.to(torch.float32), name)
        exp32 = ref_task_arithmetic(base[name], [a[name], b[name]], settings)
        differs += int(not torch.equal(actual, exp32))
    assert differs > 0, "float64 and float32 compute gave the same bits everywhere: the option had no effect"


def test_integer_tensors_are_copied_from_the_base(tmp_path):
    cfg = {"model_type": "toy", "num_hidden_layers": 2}
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    paths = []
    for name, g in zip(("base", "a", "b"), gens, strict=True):
        tensors = {
            "model.layers.0.w.weight": torch.randn(4, 6, generator=g).to(torch.bfloat16),
            "model.layers.1.w.weight": torch.randn(4, 6, generator=g).to(torch.bfloat16),
            "model.layers.0.buckets": torch.randint(0, 1000, (5, 3), generator=g, dtype=torch.int64),
            "model.position_ids": torch.randint(0, 100, (7,), generator=g, dtype=torch.int32),
            "model.mask": torch.randint(0, 2, (3, 3), generator=g).bool(),
        }
        paths.append(builders.write_safetensors_model(tmp_path / name, tensors, cfg))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ta_recipe(paths[0], paths[1:], [1.0, 0.5], extra="out_dtype: float32\n"))
    run_merge(recipe, tmp_path / "out")
    out = load_tensors(tmp_path / "out")
    base, a, b = (load_tensors(p) for p in paths)
    for name in ("model.layers.0.buckets", "model.position_ids", "model.mask"):
        assert_bitwise(out[name], base[name], name)
    for name in ("model.layers.0.w.weight", "model.layers.1.w.weight"):
        assert_bitwise(out[name], ref_task_arithmetic(base[name], [a[name], b[name]], [1.0, 0.5]), name)


# ---------------------------------------------------------------- sharding


def test_sharded_output(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = llama_family
    settings = [1.0, 0.5]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ta_recipe(fam["base"], [fam["a"], fam["b"]], settings))
    out = tmp_path / "out"
    run_merge(recipe, out, MergeOptions(shard_size=4096))
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base = load_tensors(fam["base"])
    assert set(index["weight_map"]) == set(base)
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            names = set(f.keys())
            for k in names:
                total += f.get_tensor(k).numel() * f.get_tensor(k).element_size()
        assert names == {k for k, v in index["weight_map"].items() if v == shard}
        # No shard is over the limit unless it holds a single tensor bigger than the limit.
        assert (out / shard).stat().st_size <= 4096 + 4096 or len(names) == 1
    assert index["metadata"]["total_size"] == total
    check_task_arithmetic(out, fam["base"], [fam["a"], fam["b"]], settings, n_layers=3, out_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    state = model.state_dict()
    for name, t in load_tensors(out).items():
        assert torch.equal(state[name], t), name
