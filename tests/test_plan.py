"""Planning from headers alone: per-tensor inputs, parameters and dtypes, shards, donors, and
every problem reported at once as a PlanError before anything is written."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import builders
import pytest
import torch

from mergekitlite import MergeOptions, plan_merge
from mergekitlite.errors import PlanError, RecipeError


def ta_recipe(tmp_path: Path, base: Path, models: list[tuple[Path, str]], extra: str = "") -> Path:
    lines = ["merge_method: task_arithmetic", f"base_model: {base}", "models:"]
    for m, w in models:
        lines += [f"  - model: {m}", "    parameters:", f"      weight: {w}"]
    p = tmp_path / "r.yaml"
    p.write_text("\n".join(lines) + "\n" + extra)
    return p


def sparse_checkpoint(path: Path, tensors: dict[str, tuple[str, list[int]]], config: dict) -> Path:
    """A safetensors file with a valid header whose data region is a hole: real-size models on
    no disk, and any attempt to plan by reading weights would take seconds."""
    path.mkdir(parents=True, exist_ok=True)
    sizes = {"BF16": 2, "F32": 4, "I64": 8}
    header, pos = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + pos)
    (path / "config.json").write_text(json.dumps(config))
    return path


def big_layout(layers: int, hidden: int = 8192, vocab: int = 65536) -> dict[str, tuple[str, list[int]]]:
    t = {
        "model.embed_tokens.weight": ("BF16", [vocab, hidden]),
        "lm_head.weight": ("BF16", [vocab, hidden]),
        "model.norm.weight": ("BF16", [hidden]),
    }
    for i in range(layers):
        t[f"model.layers.{i}.mlp.up_proj.weight"] = ("BF16", [4 * hidden, hidden])
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = ("BF16", [hidden, hidden])
        t[f"model.layers.{i}.input_layernorm.weight"] = ("BF16", [hidden])
    return t


def test_plan_reads_headers_only(tmp_path):
    """Three ~5 GB (sparse) checkpoints are planned in well under a second."""
    cfg = {"model_type": "llama", "num_hidden_layers": 8, "tie_word_embeddings": False, "dtype": "bfloat16"}
    paths = [sparse_checkpoint(tmp_path / n, big_layout(8), cfg) for n in ("base", "a", "b")]
    recipe = ta_recipe(tmp_path, paths[0], [(paths[1], "[0.0, 1.0]"), (paths[2], "0.5")])
    start = time.perf_counter()
    plan = plan_merge(recipe)
    elapsed = time.perf_counter() - start
    assert elapsed < 5, elapsed
    assert len(plan.tasks) == 3 + 8 * 3
    assert plan.bytes_written > 5 * 10**9
    assert plan.bytes_read == 3 * sum(t.nbytes for t in plan.tasks)
    assert len(plan.shards) == 2  # 5 GB default shard size
    # the gradient: layer i of 8 has t = i/7; outside the layers t = 0
    weights = {t.name: t.param_dict["weight"] for t in plan.tasks}
    assert weights["model.layers.7.mlp.up_proj.weight"] == (1.0, 0.5)
    assert weights["model.layers.0.mlp.up_proj.weight"] == (0.0, 0.5)
    assert weights["model.layers.1.mlp.up_proj.weight"][0] == pytest.approx(1 / 7)
    assert weights["model.embed_tokens.weight"] == (0.0, 0.5)
    assert weights["lm_head.weight"] == (0.0, 0.5)


def test_single_layer_model_has_t_1(tmp_path):
    """mergekit: with one layer, t = 1 for the layer (a gradient takes its last value)."""
    fam = builders.make_family(tmp_path / "fam", "gpt2", seed=41, layers=1)
    recipe = ta_recipe(tmp_path, fam["base"], [(fam["a"], "[0.25, 0.75]"), (fam["b"], "1.0")])
    plan = plan_merge(recipe)
    for task in plan.tasks:
        expected = 0.75 if ".h.0." in task.name else 0.25
        assert task.param_dict["weight"] == (expected, 1.0), task.name


def test_inputs_follow_the_base_and_recipe_order(llama_family, tmp_path):
    recipe = ta_recipe(tmp_path, llama_family["base"], [(llama_family["b"], "1.0"), (llama_family["a"], "2.0")])
    plan = plan_merge(recipe)
    assert {t.name for t in plan.tasks} == set(builders.load_tensors(llama_family["base"]))
    for task in plan.tasks:
        assert task.method == "task_arithmetic"
        assert task.base.model == str(llama_family["base"])
        assert [m.model for m in task.models] == [str(llama_family["b"]), str(llama_family["a"])]
        assert task.param_dict["weight"] == (1.0, 2.0)
        assert task.out_dtype == "BF16"
    assert plan.config_donor == str(llama_family["base"]) == plan.tokenizer_donor
    assert plan.compute_dtype == "float32"
    assert plan.out_config["num_hidden_layers"] == 3


def test_missing_tensors_and_shapes_all_at_once(llama_family, tmp_path):
    a = builders.load_tensors(llama_family["a"])
    del a["model.layers.0.mlp.up_proj.weight"]
    a["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(8, 16, dtype=torch.bfloat16)
    odd = builders.write_safetensors_model(tmp_path / "odd", a, builders.read_config(llama_family["a"]))
    b = builders.load_tensors(llama_family["b"])
    b["model.norm.weight"] = torch.zeros(15, dtype=torch.bfloat16)
    odd_b = builders.write_safetensors_model(tmp_path / "odd_b", b, builders.read_config(llama_family["b"]))
    recipe = ta_recipe(tmp_path, llama_family["base"], [(odd, "1.0"), (odd_b, "1.0")])
    with pytest.raises(PlanError) as info:
        plan_merge(recipe)
    text = str(info.value)
    assert f"model {str(odd)!r} has no tensor 'model.layers.0.mlp.up_proj.weight'" in text
    assert "'model.layers.2.self_attn.q_proj.weight'" in text and "[8, 16]" in text
    assert "'model.norm.weight'" in text and "[15]" in text
    assert len(info.value.problems) == 3


def test_different_layer_counts(llama_family, tmp_path):
    other = builders.make_llama(tmp_path / "four", 5, layers=4)
    recipe = ta_recipe(tmp_path, llama_family["base"], [(llama_family["a"], "1.0"), (other, "1.0")])
    with pytest.raises(PlanError, match="different numbers of layers") as info:
        plan_merge(recipe)
    assert "has 3" in str(info.value) and "has 4" in str(info.value) and "slices" in str(info.value)


def test_grouped_problems_are_summarized(llama_family, tmp_path):
    """One mistake that affects most tensors is not printed 30 times: a weight given only for the
    mlp tensors leaves every other tensor without one, which only the planner can see."""
    recipe = ta_recipe(tmp_path, llama_family["base"], [(llama_family["a"], "[{filter: mlp, value: 1.0}]")])
    with pytest.raises(PlanError) as info:
        plan_merge(recipe)
    assert len(info.value.problems) == 13  # 12 listed + "... and N more"
    assert "needs parameter 'weight'" in str(info.value) and "more like the above" in info.value.problems[-1]


def test_bad_parameter_value_is_a_recipe_error(llama_family, tmp_path):
    recipe = ta_recipe(
        tmp_path, llama_family["base"], [(llama_family["a"], "1.0")], extra="parameters:\n  normalize: maybe\n"
    )
    with pytest.raises(RecipeError, match=r"r.yaml:\d+:\d+: parameters.normalize: expected true or false, got 'maybe'"):
        plan_merge(recipe)


def test_sharding_layout(llama_family, tmp_path):
    recipe = ta_recipe(tmp_path, llama_family["base"], [(llama_family["a"], "1.0")])
    plan = plan_merge(recipe, MergeOptions(shard_size=3000))
    names = [t.name for t in plan.tasks]
    files = [s.filename for s in plan.shards]
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(plan.shard_of) == set(names)
    # shards hold consecutive tensors in plan order, each within the limit unless alone
    order = [files.index(plan.shard_of[name]) for name in names]
    assert order == sorted(order)
    for f in files:
        members = [t for t in plan.tasks if plan.shard_of[t.name] == f]
        assert sum(t.nbytes for t in members) <= 3000 or len(members) == 1
    assert len(plan_merge(recipe).shards) == 1


def test_out_dtype_and_integer_tensors(tmp_path):
    cfg = {"model_type": "toy", "num_hidden_layers": 1}
    layout = {"model.layers.0.w": ("BF16", [4, 4]), "model.layers.0.idx": ("I64", [4]), "model.head": ("F32", [2, 4])}
    paths = [sparse_checkpoint(tmp_path / n, layout, cfg) for n in ("base", "a")]
    recipe = ta_recipe(tmp_path, paths[0], [(paths[1], "1.0")], extra="out_dtype: float16\n")
    plan = plan_merge(recipe)
    tasks = {t.name: t for t in plan.tasks}
    assert tasks["model.layers.0.w"].out_dtype == "F16"
    assert tasks["model.head"].out_dtype == "F16"
    assert tasks["model.layers.0.idx"].out_dtype == "I64"
    assert tasks["model.layers.0.idx"].method == "passthrough"
    assert [i.model for i in tasks["model.layers.0.idx"].inputs] == [str(paths[0])]
    key = "dtype" if "dtype" in plan.out_config else "torch_dtype"
    assert plan.out_config[key] == "float16"


def test_rules_in_the_plan(llama_family, tmp_path):
    recipe = ta_recipe(
        tmp_path,
        llama_family["base"],
        [(llama_family["a"], "1.0"), (llama_family["b"], "0.5")],
        extra=(
            f"rules:\n  - match: re:layers\\.[01]\\.mlp\n    take: {llama_family['b']}\n"
            "  - match: norm\n    method: task_arithmetic\n    parameters:\n      weight: 0.25\n"
        ),
    )
    plan = plan_merge(recipe)
    tasks = {t.name: t for t in plan.tasks}
    taken = [n for n, t in tasks.items() if t.why.startswith("rules[0]")]
    assert sorted(taken) == sorted(n for n in tasks if ".mlp." in n and builders.layer_of(n) in (0, 1))
    for n in taken:
        assert [i.model for i in tasks[n].inputs] == [str(llama_family["b"])]
    assert tasks["model.layers.2.mlp.up_proj.weight"].param_dict["weight"] == (1.0, 0.5)
    assert tasks["model.norm.weight"].param_dict["weight"] == (0.25, 0.25)
    assert tasks["model.layers.1.input_layernorm.weight"].param_dict["weight"] == (0.25, 0.25)


def test_fingerprint_identifies_the_plan(llama_family, tmp_path):
    r1 = ta_recipe(tmp_path, llama_family["base"], [(llama_family["a"], "1.0")])
    f1 = plan_merge(r1).fingerprint()
    assert plan_merge(r1).fingerprint() == f1
    r1.write_text(r1.read_text().replace("1.0", "0.5"))
    assert plan_merge(r1).fingerprint() != f1


def test_a_tensor_the_output_would_lack_is_a_plan_error_with_its_fixes(llama_family, tmp_path):
    """Nothing is lost silently: a tensor a merged model has but the base (which the output follows) lacks stops
    the plan, naming the tensor, the model and the two rules that resolve it; each rule does what it says."""
    a = builders.load_tensors(llama_family["a"])
    a["model.extra_adapter.weight"] = torch.arange(4, dtype=torch.bfloat16).reshape(2, 2)
    extra = builders.write_safetensors_model(tmp_path / "extra", a, builders.read_config(llama_family["a"]))
    with pytest.raises(PlanError) as err:
        plan_merge(ta_recipe(tmp_path, llama_family["base"], [(extra, "1.0")]))
    assert err.value.problems == [
        f"'model.extra_adapter.weight' is in {str(extra)!r} but not in {str(llama_family['base'])!r}, which the "
        "output follows, so the output would lack it: add `rules: [{match: 'model.extra_adapter.weight', take: "
        f"{str(extra)!r}}}]` to take it from a model that has it, or `[{{match: 'model.extra_adapter.weight', drop: "
        "true}]` to leave it out"
    ]
    take = f"rules:\n  - match: model.extra_adapter.weight\n    take: {extra}\n"
    plan = plan_merge(ta_recipe(tmp_path, llama_family["base"], [(extra, "1.0")], extra=take))
    task = next(t for t in plan.tasks if t.name == "model.extra_adapter.weight")
    assert task.copy_of is not None and task.copy_of.model == str(extra)
    drop = "rules:\n  - match: extra_adapter\n    drop: true\n"
    plan = plan_merge(ta_recipe(tmp_path, llama_family["base"], [(extra, "1.0")], extra=drop))
    assert "model.extra_adapter.weight" not in {t.name for t in plan.tasks}
    assert len(plan.tasks) == len(builders.load_tensors(llama_family["base"]))


def test_drop_rules_remove_tensors_and_take_rules_fill_a_missing_input(llama_family, tmp_path):
    """A merged model that lacks a tensor no longer stops the merge when a take rule names a model that has it."""
    b = builders.load_tensors(llama_family["b"])
    del b["model.norm.weight"]
    partial = builders.write_safetensors_model(tmp_path / "partial", b, builders.read_config(llama_family["b"]))
    with pytest.raises(PlanError, match=r"has no tensor 'model\.norm\.weight'"):
        plan_merge(ta_recipe(tmp_path, llama_family["base"], [(llama_family["a"], "1.0"), (partial, "1.0")]))
    take = f"rules:\n  - match: model.norm.weight\n    take: {llama_family['a']}\n"
    plan = plan_merge(
        ta_recipe(tmp_path, llama_family["base"], [(llama_family["a"], "1.0"), (partial, "1.0")], extra=take)
    )
    task = next(t for t in plan.tasks if t.name == "model.norm.weight")
    assert task.copy_of is not None and task.copy_of.model == str(llama_family["a"])
