"""Memory budgets: a ``--max-ram`` that forces every large tensor into many row chunks gives the
same bits as the whole-tensor merge (elementwise methods and methods with whole-tensor statistics
alike), and the plan keeps its estimated peak inside the budget; impossible budgets are refused
before anything is written; planning for a GPU needs no GPU."""

from __future__ import annotations

import json
from pathlib import Path

import builders
import pytest
import torch
from builders import assert_bitwise, load_tensors, ref_task_arithmetic

from mergekitlite import MergeOptions, run_merge
from mergekitlite.api import plan_merge
from mergekitlite.budget import BASELINE_RSS, default_workers, parse_size
from mergekitlite.cli import main, merge_main
from mergekitlite.errors import PlanError

BIG = "model.embed_tokens.weight"
ROWS, COLS = 256, 1024
THREADS = 2
# Bytes one 1024-wide row costs in each in-flight chunk with 3 bf16 inputs and float32 compute:
# the raw inputs, float32 copies of them plus two temporaries, the bf16 output (see budget.py).
ROW_COST = 3 * 2 * COLS + 4 * COLS * (3 + 2) + 2 * COLS


def small_ram(workers: int) -> int:
    """A budget that leaves room for about a dozen such rows per chunk (workers + 1 chunks in flight)."""
    return BASELINE_RSS + (workers + 1) * ROW_COST * 12


SMALL_RAM = small_ram(THREADS)
# The CLI (no -j) and plan_merge without threads use one worker per core.
CLI_RAM = small_ram(default_workers())


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory) -> dict[str, Path]:
    """base, a, b: bf16 tensors 1024 wide (one 256-row matrix, two 128-row ones, 1-D norms)."""
    root = tmp_path_factory.mktemp("wide")
    cfg = {"model_type": "toy", "num_hidden_layers": 2}
    g = torch.Generator().manual_seed(7)
    base = {BIG: torch.randn(ROWS, COLS, generator=g).to(torch.bfloat16)}
    for i in range(2):
        base[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(128, COLS, generator=g).to(torch.bfloat16)
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(COLS, generator=g).to(torch.bfloat16)
    fam = {"base": builders.write_safetensors_model(root / "base", base, cfg)}
    for k, name in enumerate(("a", "b")):
        fam[name] = builders.perturb(fam["base"], root / name, 100 + k, scale=0.05)
    return fam


RECIPES = {
    "task_arithmetic": (
        "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        "  - model: {a}\n    parameters: {{weight: 0.7}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.45}}\n"
    ),
    "ties": (
        "merge_method: ties\nbase_model: {base}\nmodels:\n"
        "  - model: {a}\n    parameters: {{weight: 1.0, density: 0.4}}\n"
        "  - model: {b}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
    ),
    "slerp": ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\nparameters: {{t: 0.35}}\n"),
}


def write(tmp_path: Path, fam: dict[str, Path], method: str) -> Path:
    recipe = tmp_path / f"{method}.yaml"
    recipe.write_text(RECIPES[method].format(**fam) + "dtype: bfloat16\n")
    return recipe


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "slerp"])
def test_small_budget_gives_the_same_bits(wide_family, tmp_path, method):
    recipe = write(tmp_path, wide_family, method)
    budget = SMALL_RAM
    small = MergeOptions(max_ram=budget, threads=THREADS, hash_inputs=False)
    plan = plan_merge(recipe, small)
    big = next(t for t in plan.tasks if t.name == BIG)
    assert big.rows == ROWS
    assert big.chunk_rows * 8 <= ROWS, f"{BIG} in chunks of {big.chunk_rows} rows: the budget did not bite"
    assert all(t.chunk_rows <= t.rows for t in plan.tasks)
    assert plan.estimated_peak() <= budget

    default_plan = plan_merge(recipe, MergeOptions(threads=THREADS))
    assert next(t for t in default_plan.tasks if t.name == BIG).chunk_rows == ROWS, "default: whole tensor"

    chunked = run_merge(recipe, tmp_path / "small", small)
    assert chunked.plan.estimated_peak() <= budget
    run_merge(recipe, tmp_path / "whole", MergeOptions(threads=THREADS, hash_inputs=False))
    got, want = load_tensors(tmp_path / "small"), load_tensors(tmp_path / "whole")
    base = load_tensors(wide_family["base"])
    assert set(got) == set(want) == set(base)
    for name in want:
        assert_bitwise(got[name], want[name], name)
    assert not torch.equal(got[BIG], base[BIG]), "the merge left the base unchanged: nothing was compared"

    if method == "task_arithmetic":
        a, b = load_tensors(wide_family["a"]), load_tensors(wide_family["b"])
        for name, actual in got.items():
            exp = ref_task_arithmetic(base[name], [a[name], b[name]], [0.7, 0.45]).to(torch.bfloat16)
            assert_bitwise(actual, exp, name)


def test_small_budget_through_the_cli(wide_family, tmp_path, capsys):
    recipe = write(tmp_path, wide_family, "ties")
    cut = next(t for t in plan_merge(recipe, MergeOptions(max_ram=CLI_RAM)).tasks if t.name == BIG)
    assert cut.chunk_rows * 8 <= ROWS
    assert merge_main([str(recipe), str(tmp_path / "small"), "--max-ram", str(CLI_RAM), "--no-hash"]) == 0
    assert merge_main([str(recipe), str(tmp_path / "whole"), "--no-hash"]) == 0
    capsys.readouterr()
    got, want = load_tensors(tmp_path / "small"), load_tensors(tmp_path / "whole")
    for name in want:
        assert_bitwise(got[name], want[name], name)


@pytest.mark.parametrize(
    ("max_ram", "expected"),
    [("300MB", "below the"), ("400.05MB", "cannot fit '")],
)
def test_impossible_budget_is_refused_up_front(wide_family, tmp_path, capsys, max_ram, expected):
    recipe = write(tmp_path, wide_family, "task_arithmetic")
    with pytest.raises(PlanError, match="--max-ram"):
        plan_merge(recipe, MergeOptions(max_ram=parse_size(max_ram), threads=THREADS))
    before = {p.name for p in tmp_path.iterdir()}
    code = merge_main([str(recipe), str(tmp_path / "out"), "--max-ram", max_ram, "--no-hash"])
    err = "".join(capsys.readouterr())
    assert code == 2, err
    assert expected in err and "--max-ram" in err and "Traceback" not in err
    assert {p.name for p in tmp_path.iterdir()} == before, "something was written"


def test_plan_json_reports_chunks_and_working_sets(wide_family, tmp_path, capsys):
    recipe = write(tmp_path, wide_family, "task_arithmetic")
    assert main(["plan", str(recipe), "--max-ram", str(CLI_RAM), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    budget = CLI_RAM
    plan = plan_merge(recipe, MergeOptions(max_ram=budget))  # the same defaults as the command
    tasks = {t["name"]: t for t in data["tensors"]}
    assert set(tasks) == {t.name for t in plan.tasks}
    inflight = plan.budget.workers + 1
    for t in plan.tasks:
        entry = tasks[t.name]
        assert entry["chunk_rows"] == t.chunk_rows and 1 <= t.chunk_rows <= t.rows
        # The documented memory model: workers + 1 chunks in flight, each holding the inputs' raw
        # bytes, float32 copies of the inputs plus two temporaries, and the output bytes.
        per_row = ROW_COST * t.row_elements // COLS
        assert entry["working_set"] == inflight * per_row * t.chunk_rows, t.name
        assert entry["working_set"] + BASELINE_RSS <= budget
    assert tasks[BIG]["chunk_rows"] < ROWS
    assert data["estimated_peak"] == plan.estimated_peak() <= budget


def test_plan_json_stays_json_with_warnings(wide_family, tmp_path, capsys):
    """A recipe with a warning (a parameter the method does not use): stdout is still one JSON document."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        RECIPES["task_arithmetic"].format(**wide_family).replace("weight: 0.7", "weight: 0.7, density: 0.5")
    )
    assert main(["plan", str(recipe), "--json"]) == 0
    captured = capsys.readouterr()
    assert "density" in captured.out + captured.err, "the warning is not shown at all"
    assert captured.out.lstrip().startswith("{"), f"stdout of --json is not only JSON: {captured.out[:160]!r}"
    data = json.loads(captured.out)
    assert {t["name"] for t in data["tensors"]} >= {BIG}


def test_plan_for_cuda_needs_no_gpu(wide_family, tmp_path, capsys):
    recipe = write(tmp_path, wide_family, "task_arithmetic")
    # On the GPU a row costs its float32 working copies (3 inputs + 2 temporaries) per worker:
    # room for about 8 rows per worker.
    vram = default_workers() * 4 * COLS * (3 + 2) * 8
    plan = plan_merge(recipe, MergeOptions(device="cuda", max_vram=vram))
    assert plan.budget.on_gpu
    big = next(t for t in plan.tasks if t.name == BIG)
    assert big.chunk_rows * 8 <= ROWS
    assert 0 < plan.estimated_peak_vram() <= vram
    code = main(["plan", str(recipe), "--device", "cuda", "--max-vram", str(vram), "--tensors"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "estimated peak VRAM" in out
    assert f"{big.chunk_rows}/{ROWS}" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_merge_on_cuda_without_a_gpu_fails_cleanly(wide_family, tmp_path, capsys):
    recipe = write(tmp_path, wide_family, "task_arithmetic")
    before = {p.name for p in tmp_path.iterdir()}
    code = merge_main([str(recipe), str(tmp_path / "out"), "--device", "cuda", "--max-vram", "8GB", "--no-hash"])
    err = "".join(capsys.readouterr())
    assert code == 2, err
    assert "no CUDA device" in err and "Traceback" not in err
    assert {p.name for p in tmp_path.iterdir()} == before
