"""Bad input through the command line: a specific message, exit code 2, and nothing written
(neither OUT nor OUT.partial)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import builders
import pytest
import torch
from builders import subprocess_env

from mergekitlite.cli import main, merge_main


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    # rich wraps at $COLUMNS when not on a terminal; these tests look at message content, one
    # test below checks the wrapping separately.
    monkeypatch.setenv("COLUMNS", "1000")


def where(text: str, needle: str, *, occurrence: int = 1) -> tuple[int, int]:
    """1-based (line, column) of the ``occurrence``-th ``needle`` in ``text``."""
    pos = -1
    for _ in range(occurrence):
        pos = text.index(needle, pos + 1)
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


def run_merge_cli(capsys, recipe: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = merge_main([str(recipe), str(out), "--no-hash", *extra])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    partial = out.with_name(out.name + ".partial")
    assert not partial.exists(), f"{partial} was created"


def ta(fam: dict[str, Path], *, b_params: str = "    parameters:\n      weight: 1.0\n", extra: str = "") -> str:
    return (
        "merge_method: task_arithmetic\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {fam['a']}\n    parameters:\n      weight: 1.0\n"
        f"  - model: {fam['b']}\n{b_params}" + extra
    )


def test_typo_key_with_position(llama_family, write_recipe, tmp_path, capsys):
    text = ta(llama_family, b_params="    paramters:\n      weight: 1.0\n")
    recipe = write_recipe(text)
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    line, col = where(text, "paramters")
    assert code == 2
    assert f"{recipe}:{line}:{col}: models[1].paramters: unknown key (did you mean 'parameters'?)" in err
    assert_nothing_written(tmp_path / "out")


def test_unknown_method_suggests(llama_family, write_recipe, tmp_path, capsys):
    text = ta(llama_family).replace("task_arithmetic", "task_arithmatic")
    recipe = write_recipe(text)
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    assert code == 2
    line, col = where(text, "task_arithmatic")
    assert f"{recipe}:{line}:{col}: merge_method: unknown merge method 'task_arithmatic'" in err
    assert "did you mean 'task_arithmetic'?" in err
    assert_nothing_written(tmp_path / "out")


def test_missing_model_folder_is_named(llama_family, write_recipe, tmp_path, capsys):
    fam = dict(llama_family, b=tmp_path / "models" / "no-such-model")
    recipe = write_recipe(ta(fam))
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    assert code == 2
    assert "no-such-model" in err and "no such folder" in err
    assert_nothing_written(tmp_path / "out")


def test_wrong_type_weight(llama_family, write_recipe, tmp_path, capsys):
    text = ta(llama_family, b_params='    parameters:\n      weight: "abc"\n')
    recipe = write_recipe(text)
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    assert code == 2
    assert "weight" in err and "'abc'" in err and "number" in err
    assert_nothing_written(tmp_path / "out")


def test_wrong_type_weight_is_a_recipe_error_with_position(llama_family, write_recipe, capsys):
    """A string where a number belongs needs no model file to detect: ``validate`` reports it
    once, at its place in the file (not once per tensor at merge time)."""
    text = ta(llama_family, b_params='    parameters:\n      weight: "abc"\n')
    recipe = write_recipe(text)
    code = main(["validate", str(recipe)])
    err = "".join(capsys.readouterr())
    line, _ = where(text, '"abc"')
    assert code == 2, f"validate accepted weight: 'abc'\n{err}"
    assert f"{recipe}:{line}:" in err and "models[1].parameters.weight" in err
    assert err.count("'abc'") == 1


def test_shape_mismatch_names_tensor_and_shapes(llama_family, write_recipe, tmp_path, capsys):
    b = builders.load_tensors(llama_family["b"])
    b["model.layers.1.mlp.up_proj.weight"] = torch.zeros(40, 16, dtype=torch.bfloat16)
    odd = builders.write_safetensors_model(tmp_path / "odd", b, builders.read_config(llama_family["b"]))
    recipe = write_recipe(ta(dict(llama_family, b=odd)))
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    assert code == 2
    assert "'model.layers.1.mlp.up_proj.weight'" in err
    assert "[32, 16]" in err and "[40, 16]" in err and str(odd) in err
    assert_nothing_written(tmp_path / "out")


def test_gradient_on_model_without_layers(write_recipe, tmp_path, capsys):
    cfg = {"model_type": "toy"}
    paths = {}
    for k, name in enumerate(("base", "a", "b")):
        g = torch.Generator().manual_seed(k)
        tensors = {"embed.weight": torch.randn(4, 4, generator=g), "head.weight": torch.randn(4, 4, generator=g)}
        paths[name] = builders.write_safetensors_model(tmp_path / name, tensors, cfg)
    recipe = write_recipe(ta(paths, b_params="    parameters:\n      weight: [0.0, 1.0]\n"))
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    assert code == 2
    assert "models[1].parameters.weight" in err and "gradient" in err and "layers" in err
    assert_nothing_written(tmp_path / "out")


def test_missing_required_weight(llama_family, write_recipe, tmp_path, capsys):
    text = ta(llama_family, b_params="")
    recipe = write_recipe(text)
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    assert code == 2
    line, col = where(text, f"model: {llama_family['b']}\n")
    col += len("model: ")
    assert f"{recipe}:{line}:{col}: models[1].model: task_arithmetic needs parameters.weight for this model" in err
    assert_nothing_written(tmp_path / "out")


def test_duplicate_key(llama_family, write_recipe, tmp_path, capsys):
    """The later value wins, as in mergekit: a warning; --strict makes it an error."""
    text = ta(llama_family, extra="dtype: bfloat16\ndtype: float16\n")
    recipe = write_recipe(text)
    line, col = where(text, "dtype:", occurrence=2)
    code, err = run_merge_cli(capsys, recipe, tmp_path / "strict", "--strict")
    assert code == 2
    assert f"{recipe}:{line}:{col}: dtype: duplicate key" in err
    assert_nothing_written(tmp_path / "strict")
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    assert code == 0, err
    assert f"warning: {recipe}:{line}:{col}: dtype: duplicate key" in err
    assert {t.dtype for t in builders.load_tensors(tmp_path / "out").values()} == {torch.float16}


def test_invalid_yaml_syntax_has_line_and_column(write_recipe, tmp_path, capsys):
    recipe = write_recipe("merge_method: linear\nmodels:\n  - model: a\n   parameters: x\n")
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    assert code == 2
    assert f"{recipe}:4:4: invalid YAML" in err
    assert_nothing_written(tmp_path / "out")


def test_output_inside_an_input_model(llama_family, write_recipe, tmp_path, capsys):
    recipe = write_recipe(ta(llama_family))
    out = llama_family["a"] / "merged"
    code, err = run_merge_cli(capsys, recipe, out)
    assert code == 2
    assert "inside the folder of input model" in err and str(llama_family["a"]) in err
    assert_nothing_written(out)
    # ...or an output folder that contains an input.
    code, err = run_merge_cli(capsys, recipe, llama_family["base"].parent)
    assert code == 2 and "contains input model" in err
    assert not llama_family["base"].parent.with_name(llama_family["base"].parent.name + ".partial").exists()


def test_existing_output_needs_overwrite(llama_family, write_recipe, tmp_path, capsys):
    recipe = write_recipe(ta(llama_family))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    code, err = run_merge_cli(capsys, recipe, out)
    assert code == 2
    assert "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "old"
    assert not (tmp_path / "out.partial").exists()

    code, err = run_merge_cli(capsys, recipe, out, "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not (tmp_path / "out.partial").exists()


def test_unknown_chat_template_fails_before_writing(llama_family, write_recipe, tmp_path, capsys):
    recipe = write_recipe(ta(llama_family, extra="chat_template: chatmlx\n"))
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    assert code == 2
    assert "chatmlx" in err
    assert_nothing_written(tmp_path / "out")


def test_missing_tokenizer_source_is_named(llama_family, write_recipe, tmp_path, capsys):
    recipe = write_recipe(ta(llama_family, extra=f"tokenizer_source: {tmp_path / 'no-such-chat-model'}\n"))
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    assert code == 2 and "no-such-chat-model" in err
    assert_nothing_written(tmp_path / "out")


def test_several_problems_reported_at_once(llama_family, write_recipe, tmp_path, capsys):
    text = (
        "merge_method: task_arithmetic\n"
        f"base_model: {llama_family['base']}\n"
        "models:\n"
        f"  - model: {llama_family['a']}\n    parameters:\n      wieght: 1.0\n"
        f"  - model: {llama_family['b']}\n    paramters:\n      weight: 1.0\n"
        "dtype: bfloat17\n"
        "out_dtype: float16\n"
        "out_dtype: float32\n"
    )
    recipe = write_recipe(text)
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    assert code == 2
    expected = [
        (
            where(text, "wieght"),
            "models[0].parameters.wieght: unknown parameter for task_arithmetic (did you mean 'weight'?)",
        ),
        (where(text, "paramters"), "models[1].paramters: unknown key (did you mean 'parameters'?)"),
        (where(text, "bfloat17"), "dtype: "),
        (where(text, "out_dtype", occurrence=2), "out_dtype: duplicate key"),
    ]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    for (line, col), msg in expected:
        assert any(f"{recipe}:{line}:{col}: {msg}" in ln for ln in lines), f"missing {line}:{col}: {msg}\n{err}"
    assert "bfloat17" in err
    assert_nothing_written(tmp_path / "out")


def test_plan_errors_are_all_reported_at_once(llama_family, write_recipe, tmp_path, capsys):
    """Two models missing and a shape mismatch: all in one run."""
    b = builders.load_tensors(llama_family["b"])
    b["model.norm.weight"] = torch.ones(17, dtype=torch.bfloat16)
    odd = builders.write_safetensors_model(tmp_path / "odd", b, builders.read_config(llama_family["b"]))
    text = (
        "merge_method: task_arithmetic\n"
        f"base_model: {llama_family['base']}\n"
        "models:\n"
        f"  - model: {tmp_path / 'gone-1'}\n    parameters:\n      weight: 1.0\n"
        f"  - model: {tmp_path / 'gone-2'}\n    parameters:\n      weight: 1.0\n"
    )
    recipe = write_recipe(text)
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    assert code == 2 and "gone-1" in err and "gone-2" in err
    text2 = text.replace(str(tmp_path / "gone-1"), str(odd)).replace(str(tmp_path / "gone-2"), str(llama_family["a"]))
    recipe.write_text(text2)
    code, err = run_merge_cli(capsys, recipe, tmp_path / "out")
    assert code == 2 and "'model.norm.weight'" in err and "[17]" in err and "[16]" in err
    assert_nothing_written(tmp_path / "out")


def test_missing_recipe_file(tmp_path, capsys):
    code, err = run_merge_cli(capsys, tmp_path / "nope.yaml", tmp_path / "out")
    assert code == 2 and "nope.yaml" in err and "no such recipe file" in err
    assert_nothing_written(tmp_path / "out")


def test_validate_and_plan_commands(llama_family, write_recipe, capsys):
    good = write_recipe(ta(llama_family), name="good.yaml")
    bad = write_recipe(ta(llama_family).replace("weight", "wieght", 1), name="bad.yaml")
    assert main(["validate", str(good)]) == 0
    assert f"{good}: ok" in capsys.readouterr().out
    assert main(["validate", str(good), str(bad)]) == 2
    out = capsys.readouterr()
    assert "did you mean 'weight'" in out.out + out.err
    assert main(["plan", str(good), "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in data["tensors"]} == set(builders.load_tensors(llama_family["base"]))
    assert data["shards"] == ["model.safetensors"]


def test_subprocess_errors_are_one_line_each(llama_family, tmp_path):
    """Through a real process with stderr piped (no terminal, no COLUMNS): exit code 2, and each
    problem is on one line, so editors and CI logs can jump to file:line:col."""
    text = ta(llama_family, b_params="    paramters:\n      weight: 1.0\n")
    text = text.replace("task_arithmetic", "task_arithmatic")
    recipe = tmp_path / ("a-rather-long-recipe-file-name-" + "x" * 40 + ".yaml")
    recipe.write_text(text)
    env = subprocess_env()
    env.pop("COLUMNS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from mergekitlite.cli import merge_main; sys.exit(merge_main())",
            str(recipe),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    line, col = where(text, "task_arithmatic")
    first = (
        f"{recipe}:{line}:{col}: merge_method: unknown merge method 'task_arithmatic' (did you mean 'task_arithmetic'?)"
    )
    assert any(ln.removeprefix("error: ").startswith(first) for ln in proc.stderr.splitlines()), proc.stderr
    line, col = where(text, "paramters")
    second = f"{recipe}:{line}:{col}: models[1].paramters: unknown key (did you mean 'parameters'?)"
    assert any(ln.removeprefix("error: ").startswith(second) for ln in proc.stderr.splitlines()), proc.stderr
    assert_nothing_written(tmp_path / "out")


def test_library_messages_are_one_line_and_whole_sentences():
    """transformers spreads its errors over several lines; the first line alone can stop mid-sentence."""
    from mergekitlite.errors import one_line

    exc = OSError(
        "Can't load tokenizer for 'x'. If you were trying to load it from 'https://huggingface.co/models',\n"
        "make sure you don't have a local directory with the same name. Otherwise, make sure 'x' is the\n"
        "correct path to a directory containing all relevant files for a LlamaTokenizerFast tokenizer."
    )
    text = one_line(exc)
    assert "\n" not in text and text.endswith("LlamaTokenizerFast tokenizer.")
    assert one_line(exc, limit=60) == "Can't load tokenizer for 'x'."
    assert one_line(ValueError()) == "ValueError"
    assert one_line(ValueError("a " * 200), limit=50).endswith("…")
