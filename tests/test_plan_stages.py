"""The planner's stages called one at a time: normalise, enumerate, plan one tensor, size, shard, configure.

Each stage takes typed values and returns one; these tests build their inputs by hand (or from the
previous stage) so that a failure points at the stage that broke."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekitlite.budget import Budget
from mergekitlite.errors import PlanError
from mergekitlite.methods import get_method
from mergekitlite.plan.finish import dominant_dtype, layout_shards, output_config, size_chunks
from mergekitlite.plan.inputs import lookup_tensor, open_recipe_sources
from mergekitlite.plan.layout import enumerate_outputs, normalize, reference_model
from mergekitlite.plan.params import resolve_params
from mergekitlite.plan.problems import MAX_LISTED, Problems
from mergekitlite.plan.tensors import TensorContext, plan_tensor
from mergekitlite.recipe import LoadedRecipe, parse_recipe
from mergekitlite.sources import ModelSource
from mergekitlite.taskgraph import TensorTask
from mergekitlite.tokens import read_token_info


def _loaded(text: str, where: Path) -> LoadedRecipe:
    return parse_recipe(text, path=where / "r.yaml")


def _staged(text: str, where: Path) -> tuple[LoadedRecipe, dict[str, ModelSource]]:
    loaded = _loaded(text, where)
    return loaded, open_recipe_sources(loaded.recipe, loaded.base_dir)


def _context(loaded: LoadedRecipe, sources: dict[str, ModelSource], reference: str) -> TensorContext:
    return TensorContext(
        recipe=loaded.recipe,
        spec=get_method(loaded.recipe.merge_method),
        sources=sources,
        reference=sources[reference],
        tokenizer_donor=reference,
        tokens=read_token_info(sources[reference].path),
        out_dtype=None,
    )


def test_a_models_recipe_is_one_slice_over_whole_models(llama_family, tmp_path):
    f = llama_family
    loaded, sources = _staged(
        f"""
merge_method: ties
base_model: {f["base"]}
models:
  - model: {f["a"]}
    parameters: {{weight: 1.0}}
  - model: {f["b"]}
    parameters: {{weight: 0.5}}
""",
        tmp_path,
    )
    slices = normalize(loaded.recipe, get_method("ties"), sources)
    assert len(slices) == 1
    # the base joins the sources (the method uses one) after the listed models
    assert [s.model for s in slices[0].sources] == [str(f["a"]), str(f["b"]), str(f["base"])]
    assert slices[0].length == 3
    assert reference_model(loaded.recipe, slices) == str(f["base"])

    layout = enumerate_outputs(loaded.recipe, slices, sources, sources[str(f["base"])])
    assert layout.layers is None  # names, order and layer count follow the reference
    assert [s.name for s in layout.slots] == list(sources[str(f["base"])].tensors)
    by_name = {s.name: s for s in layout.slots}
    assert by_name["model.layers.2.mlp.up_proj.weight"].t == 1.0
    assert by_name["model.layers.1.mlp.up_proj.weight"].t == 0.5
    assert by_name["model.embed_tokens.weight"].layer is None
    assert by_name["model.embed_tokens.weight"].t == 0.0


def test_slices_restack_layers_under_the_reference_prefix(llama_family, tmp_path):
    f = llama_family
    loaded, sources = _staged(
        f"""
merge_method: passthrough
slices:
  - sources: [{{model: {f["a"]}, layer_range: [0, 2]}}]
  - sources: [{{model: {f["b"]}, layer_range: [1, 3]}}]
""",
        tmp_path,
    )
    slices = normalize(loaded.recipe, get_method("passthrough"), sources)
    assert [(s.sources[0].model, s.sources[0].start, s.length) for s in slices] == [
        (str(f["a"]), 0, 2),
        (str(f["b"]), 1, 2),
    ]
    ref = sources[reference_model(loaded.recipe, slices)]
    layout = enumerate_outputs(loaded.recipe, slices, sources, ref)
    assert layout.layers == 4
    slot = {s.name: s for s in layout.slots}["model.layers.3.self_attn.q_proj.weight"]
    assert slot.inputs == ("model.layers.2.self_attn.q_proj.weight",)  # b's layer 1 + 1
    assert slot.slice is slices[1]
    assert slot.t == 1.0  # last layer of its slice
    names = [s.name for s in layout.slots]
    assert names[0] == "model.embed_tokens.weight"  # embeddings first, the rest after the layers
    assert set(names[-2:]) == {"model.norm.weight", "lm_head.weight"}


def test_normalize_reports_every_bad_slice_at_once(llama_family, tmp_path):
    f = llama_family
    loaded, sources = _staged(
        f"""
merge_method: linear
slices:
  - sources:
      - {{model: {f["a"]}, layer_range: [0, 2], parameters: {{weight: 1}}}}
      - {{model: {f["b"]}, layer_range: [0, 3], parameters: {{weight: 1}}}}
  - sources:
      - {{model: {f["a"]}, layer_range: [2, 5], parameters: {{weight: 1}}}}
""",
        tmp_path,
    )
    with pytest.raises(PlanError) as err:
        normalize(loaded.recipe, get_method("linear"), sources)
    assert err.value.problems == [
        "slices[0]: every source must span the same number of layers, got [2, 3]",
        f"slices[1].sources[0].layer_range: [2, 5] is past the end of {str(f['a'])!r}, which has 3 layers",
    ]


def test_plan_tensor_alone(llama_family, tmp_path):
    f = llama_family
    loaded, sources = _staged(
        f"""
merge_method: task_arithmetic
base_model: {f["base"]}
models:
  - model: {f["a"]}
    parameters: {{weight: [0.0, 1.0]}}
rules:
  - match: lm_head
    take: {f["a"]}
""",
        tmp_path,
    )
    slices = normalize(loaded.recipe, get_method("task_arithmetic"), sources)
    ctx = _context(loaded, sources, str(f["base"]))
    layout = enumerate_outputs(loaded.recipe, slices, sources, ctx.reference)
    slots = {s.name: s for s in layout.slots}
    problems = Problems()

    up = plan_tensor(slots["model.layers.1.mlp.up_proj.weight"], ctx, problems)
    assert up is not None and not problems
    assert up.task.method == "task_arithmetic"
    assert up.task.base is not None and up.task.base.model == str(f["base"])
    assert [m.model for m in up.task.models] == [str(f["a"])]
    assert up.task.param_dict["weight"] == (0.5,)

    head = plan_tensor(slots["lm_head.weight"], ctx, problems)
    assert head is not None
    assert head.task.copy_of is not None and head.task.copy_of.model == str(f["a"])
    assert head.task.why == f"rules[0]: taken from {f['a']}"


def test_plan_tensor_reports_a_missing_input(llama_family, tmp_path):
    f = llama_family
    loaded, sources = _staged(
        f"""
merge_method: linear
models:
  - model: {f["a"]}
    parameters: {{weight: 1.0}}
""",
        tmp_path,
    )
    slices = normalize(loaded.recipe, get_method("linear"), sources)
    ctx = _context(loaded, sources, str(f["a"]))
    layout = enumerate_outputs(loaded.recipe, slices, sources, ctx.reference)
    slot = layout.slots[0]
    broken = type(slot)(slot.name, slot.layer, slot.t, slot.slice, ("no.such.tensor",))
    problems = Problems()
    assert plan_tensor(broken, ctx, problems) is None
    assert problems.all() == [f"cannot merge {slot.name!r}: model {str(f['a'])!r} has no tensor 'no.such.tensor'"]


def test_resolve_params_levels_and_gradients():
    spec = get_method("ties")
    problems = Problems()
    params = resolve_params(
        spec,
        "model.layers.1.mlp.up_proj.weight",
        0.5,
        [[None, {"weight": 2.0}, None, {"density": [0.2, 0.6]}], [{"weight": 1.0}, {"weight": 3.0}, None, None]],
        ["a", "b"],
        [None, None, {"normalize": 0}],
        problems,
    )
    assert not problems
    d = dict(params)
    assert d["weight"] == (2.0, 1.0)  # the first level that sets it wins
    assert d["density"] == (pytest.approx(0.4), 1.0)  # a gradient at t = 0.5; the default for b
    assert d["normalize"] is False  # 0 read as false, as mergekit's float-typed configs write it


def test_problems_are_grouped_and_summarized():
    problems = Problems()
    for i in range(MAX_LISTED + 3):
        problems.add(f"missing {i}", group="missing")
    problems.add("a single line")
    lines = problems.all()
    assert lines[0] == "a single line"
    assert lines[1 : 1 + MAX_LISTED] == [f"missing {i}" for i in range(MAX_LISTED)]
    assert lines[-1] == "... and 3 more like the above"
    with pytest.raises(PlanError):
        problems.raise_if_any()


def _task(name: str, shape: tuple[int, ...], dtype: str = "BF16") -> TensorTask:
    return TensorTask(name, "linear", None, (), (), shape, dtype, None, 0.0)


def test_layout_shards_by_bytes_and_by_parameters():
    tasks = [_task("a", (10,)), _task("b", (10,)), _task("c", (30,))]  # 20, 20, 60 bytes
    shards, shard_of = layout_shards(tasks, shard_size=45)
    assert [s.filename for s in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert shard_of == {"a": shards[0].filename, "b": shards[0].filename, "c": shards[1].filename}
    shards, shard_of = layout_shards(tasks, shard_size=10**9, shard_params=15)  # mergekit's unit: parameters
    assert len(shards) == 3
    shards, _ = layout_shards(tasks, shard_size=10**9)
    assert [s.filename for s in shards] == ["model.safetensors"]


def test_output_config_follows_the_tasks(llama_family):
    from mergekitlite.sources import index_model

    donor = index_model("base", llama_family["base"])
    tasks = [_task("model.embed_tokens.weight", (40, 8)), _task("lm_head.weight", (40, 8), "F32")]
    cfg = output_config(donor, tasks, None, layers=5)
    assert cfg["num_hidden_layers"] == 5
    assert cfg["vocab_size"] == 40
    assert cfg["torch_dtype" if "torch_dtype" in donor.config else "dtype"] == "float32"  # most bytes are F32
    assert dominant_dtype(tasks) == "float32"
    assert donor.config["num_hidden_layers"] == 3  # the donor's own config is not touched


def test_size_chunks_respects_the_budget_and_seeds_random_methods(llama_family):
    from mergekitlite.sources import index_model

    src = index_model("a", llama_family["a"])
    info = lookup_tensor(src, "model.embed_tokens.weight")
    assert info is not None
    from mergekitlite.taskgraph import InputRef

    ref = InputRef("a", info)
    tasks = [
        TensorTask("x", "dare_linear", ref, (ref,), (("density", (0.5,)),), info.shape, "BF16", None, 0.0),
        TensorTask("y", "linear", None, (ref,), (), info.shape, "BF16", None, 0.0),
    ]
    small = Budget(ram=400 * 1000**2 + 64 * 1024, workers=1)
    sized = size_chunks(tasks, "float32", small, seed=7)
    assert sized[0].seed != 0 and sized[1].seed == 0
    assert all(1 <= t.chunk_rows <= info.shape[0] for t in sized)
    roomy = size_chunks(tasks, "float32", Budget(ram=10**12, workers=1), seed=7)
    assert roomy[1].chunk_rows >= sized[1].chunk_rows
