"""Merge options are declared once (``mergekitlite.options``): ``merge`` and ``plan`` get their flags from
the declaration, a value is checked the same way from a flag or from Python, and ``plan`` with the same
flags estimates what ``merge`` will do."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from builders import subprocess_env

from mergekitlite import MergeOptions, plan_merge
from mergekitlite.cli import main, merge_main
from mergekitlite.cli.cmd_merge import add_merge_arguments, add_plan_arguments, merge_options
from mergekitlite.options import DEFAULT_SHARD_SIZE, OptionError, flag_of


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


def parse(add, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def declared() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(MergeOptions) if flag_of(f) is not None}


def test_every_declared_option_is_a_flag_of_merge_and_the_planning_ones_of_plan():
    merge = parse(add_merge_arguments, ["r.yaml"])
    plan = parse(add_plan_arguments, ["r.yaml"])
    for name, f in declared().items():
        assert hasattr(merge, name), name
        assert hasattr(plan, name) == flag_of(f).planning, name
    # The defaults come from the declaration: no flags give MergeOptions().
    assert merge_options(merge) == MergeOptions()
    assert merge_options(plan) == MergeOptions()
    assert {n for n, f in declared().items() if flag_of(f).planning} >= {"threads", "max_ram", "device", "shard_size"}


def test_flags_become_the_same_options_as_python():
    argv = [
        "r.yaml",
        "out",
        "--device",
        "cuda:1",
        "--shard-size",
        "2GB",
        "--out-shard-size",
        "1B",
        "--compute-dtype",
        "float64",
        "--max-ram",
        "3GiB",
        "--max-vram",
        "500MB",
        "--random-seed",
        "7",
        "--resume",
        "--overwrite",
        "-j",
        "3",
        "--no-hash",
        "--no-native",
        "--no-copy-tokenizer",
        "--intermediate-dir",
        "steps",
    ]
    expected = MergeOptions(
        device="cuda:1",
        shard_size=2 * 10**9,
        shard_params=10**9,
        compute_dtype="float64",
        max_ram=3 * 2**30,
        max_vram=500 * 10**6,
        random_seed=7,
        resume=True,
        overwrite=True,
        threads=3,
        hash_inputs=False,
        native=False,
        copy_tokenizer=False,
        intermediate_dir=Path("steps"),
    )
    assert merge_options(parse(add_merge_arguments, argv)) == expected
    assert MergeOptions().shard_size == DEFAULT_SHARD_SIZE == 5 * 10**9
    # mergekit's spellings map onto the same fields.
    mk = parse(add_merge_arguments, ["r.yaml", "--cuda", "--num-threads", "2", "--copy-tokenizer"])
    assert merge_options(mk) == MergeOptions(device="cuda", threads=2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-j", "0"], "merge: error: argument -j/--threads: must be at least 1 (got 0)"),
        (["--threads", "x"], "merge: error: argument -j/--threads: not an integer: 'x'"),
        (["--max-ram", "0"], "merge: error: argument --max-ram: must be more than 0 (got 0)"),
        (["--shard-size", "-5"], "merge: error: argument --shard-size: must be more than 0 (got -5)"),
        (
            ["--max-vram", "lots"],
            "merge: error: argument --max-vram: not a size: 'lots' (expected e.g. 5GB, 500MB, 2GiB)",
        ),
        (["--num-threads", "0"], "merge: error: argument --num-threads: must be at least 1 (got 0)"),
    ],
)
def test_out_of_range_values_are_one_line_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        merge_main([str(tmp_path / "r.yaml"), str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.splitlines() == [f"{message} (see merge --help)"]
    assert not (tmp_path / "out").exists()


def test_plan_refuses_the_same_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(tmp_path / "r.yaml"), "-j", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "mergekitlite plan: error: argument -j/--threads: must be at least 1 (got 0) (see mergekitlite plan --help)"
    ]


def test_python_options_are_checked_like_flags():
    with pytest.raises(OptionError) as err:
        MergeOptions(threads=0, max_ram=-1, compute_dtype="float8")
    assert str(err.value).splitlines() == [
        "compute_dtype (--compute-dtype): expected one of float32, float64, bfloat16, float16 (got 'float8')",
        "max_ram (--max-ram): must be more than 0 (got -1)",
        "threads (-j/--threads): must be at least 1 (got 0)",
    ]


def test_plan_takes_merge_threads_so_the_estimates_agree(llama_family, write_recipe, capsys):
    """The memory estimate depends on the chunks in flight (-j): plan -j N estimates what merge -j N plans."""
    recipe = write_recipe(
        "merge_method: task_arithmetic\n"
        f"base_model: {llama_family['base']}\n"
        "models:\n"
        f"  - model: {llama_family['a']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {llama_family['b']}\n    parameters: {{weight: 0.5}}\n"
    )
    peaks = {}
    for threads in (1, 6):
        assert main(["plan", str(recipe), "--json", "-j", str(threads), "--max-ram", "8GB"]) == 0
        data = json.loads(capsys.readouterr().out)
        expected = plan_merge(recipe, MergeOptions(threads=threads, max_ram=8 * 10**9))
        assert data["estimated_peak"] == expected.estimated_peak()
        assert [t["working_set"] for t in data["tensors"]] == [expected.task_working_set(t)[0] for t in expected.tasks]
        peaks[threads] = data["estimated_peak"]
    assert peaks[6] > peaks[1]


def test_version(capsys):
    from mergekitlite import __version__

    for run in (lambda: merge_main(["--version"]), lambda: main(["--version"])):
        with pytest.raises(SystemExit) as exit_:
            run()
        assert exit_.value.code == 0
        assert capsys.readouterr().out == f"mergekitlite {__version__}\n"
    proc = subprocess.run(
        [sys.executable, "-m", "mergekitlite.cli", "--version"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout == f"mergekitlite {__version__}\n"
