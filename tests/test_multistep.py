"""Multi-step recipes (mergekit-multi's format): a named step's output feeds later steps; the
two-step chat vector (extract with ``task_vector`` in float32, apply with ``add_delta``) is bit for
bit the one-step ``add_difference``; intermediate folders go where the recipe or options say,
are reused when up to date and remade when their step changed; an interrupted last step resumes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import builders
import pytest
import torch
from builders import assert_bitwise, journal_done, load_tensors, read_config, ref_add_difference, subprocess_env

from mergekitlite import MergeOptions, run_merge
from mergekitlite.cli import main, merge_main
from mergekitlite.errors import RecipeError
from mergekitlite.recipe import load_recipes

JOURNAL = "mergekitlite-journal.jsonl"
W = 0.8


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    """base (pretrained), cpt (continued pretraining), chat: bf16 Llamas, 3 layers."""
    root = tmp_path_factory.mktemp("multi")
    f = builders.make_family(root, "llama", seed=41, config_extra={"mklt_donor": "base"})
    cpt = builders.perturb(f["a"], root / "cpt", 42, config_extra={"mklt_donor": "cpt"})
    return {"base": f["base"], "cpt": cpt, "chat": f["b"]}


@pytest.fixture(scope="module")
def tensors(fam) -> dict[str, dict[str, torch.Tensor]]:
    return {k: load_tensors(v) for k, v in fam.items()}


def two_step(fam: dict[str, Path], *, step1_extra: str = "", vec_weight: float | None = None) -> str:
    w = "" if vec_weight is None else f"    parameters: {{weight: {vec_weight}}}\n"
    return (
        "name: chatvec\n"
        "merge_method: task_vector\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {fam['chat']}\n{w}"
        "out_dtype: float32\n" + step1_extra + "---\n"
        "merge_method: add_delta\n"
        f"base_model: {fam['cpt']}\n"
        "models:\n"
        "  - model: chatvec\n"
        f"    parameters: {{weight: {W}}}\n"
        "dtype: bfloat16\n"
    )


def one_step(fam: dict[str, Path]) -> str:
    return (
        "merge_method: add_difference\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {fam['cpt']}\n"
        f"  - model: {fam['chat']}\n    parameters: {{weight: {W}}}\n"
        "dtype: bfloat16\n"
    )


def expected_final(t: dict[str, dict[str, torch.Tensor]], vec_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """cpt + 0.8·(vec_weight·(chat − base)), float32, cast once to bf16."""
    out = {}
    for name, b in t["base"].items():
        if vec_weight == 1.0:
            out[name] = ref_add_difference(b, [t["cpt"][name], t["chat"][name]], [1.0, W]).to(torch.bfloat16)
        else:
            delta = (t["chat"][name].float() - b.float()) * vec_weight
            out[name] = (delta * W + t["cpt"][name].float()).to(torch.bfloat16)
    return out


def assert_tensors(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_tensors(folder)
    assert set(got) == set(expected)
    for name, exp in expected.items():
        assert_bitwise(got[name], exp, name)


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_two_steps_equal_one_step_add_difference(fam, tensors, tmp_path):
    (tmp_path / "two.yaml").write_text(two_step(fam))
    (tmp_path / "one.yaml").write_text(one_step(fam))
    result = run_merge(tmp_path / "two.yaml", tmp_path / "out", MergeOptions(hash_inputs=False))
    run_merge(tmp_path / "one.yaml", tmp_path / "one", MergeOptions(hash_inputs=False))

    inter = tmp_path / "out.steps" / "chatvec"
    assert [s.output for s in result.steps] == [inter.resolve()]
    # The delta is stored exactly: float32 differences of bf16 weights.
    delta = load_tensors(inter)
    for name, b in tensors["base"].items():
        assert_bitwise(delta[name], tensors["chat"][name].float() - b.float(), name)
    assert read_config(inter)["dtype"] == "float32"

    expected = expected_final(tensors)
    assert_tensors(tmp_path / "out", expected)
    one = load_tensors(tmp_path / "one")
    for name, t in load_tensors(tmp_path / "out").items():
        assert_bitwise(t, one[name], name)
    cfg = read_config(tmp_path / "out")
    assert cfg["mklt_donor"] == "cpt" and cfg["dtype"] == "bfloat16"
    # The final output records the whole pipeline: it is needed to reproduce it.
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == (tmp_path / "two.yaml").read_text()


def test_intermediate_folder_from_output_key(fam, tensors, tmp_path):
    where = tmp_path / "elsewhere" / "vec"
    (tmp_path / "r.yaml").write_text(two_step(fam, step1_extra=f"output: {where}\n"))
    run_merge(tmp_path / "r.yaml", tmp_path / "out", MergeOptions(hash_inputs=False))
    assert (where / "model.safetensors").is_file()
    assert not (tmp_path / "out.steps").exists()
    assert_tensors(tmp_path / "out", expected_final(tensors))


def test_intermediate_dir_option(fam, tensors, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(two_step(fam))
    inter = tmp_path / "inter"
    code = merge_main([str(tmp_path / "r.yaml"), str(tmp_path / "out"), "--intermediate-dir", str(inter), "--no-hash"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (inter / "chatvec" / "model.safetensors").is_file()
    assert not (tmp_path / "out.steps").exists()
    assert_tensors(tmp_path / "out", expected_final(tensors))


def test_up_to_date_step_is_skipped_and_changed_step_remade(fam, tensors, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(two_step(fam))
    inter = tmp_path / "out.steps" / "chatvec"
    run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False))
    before = mtimes(inter)

    again = run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False, overwrite=True))
    assert [s.up_to_date for s in again.steps] == [True]
    assert mtimes(inter) == before, "an up-to-date step was written again"
    assert_tensors(tmp_path / "out", expected_final(tensors))

    # Step 1 changed: its folder is remade and the final output follows.
    recipe.write_text(two_step(fam, vec_weight=0.5))
    changed = run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False, overwrite=True))
    assert [s.up_to_date for s in changed.steps] == [False]
    assert mtimes(inter) != before
    delta = load_tensors(inter)
    for name, b in tensors["base"].items():
        assert_bitwise(delta[name], (tensors["chat"][name].float() - b.float()) * 0.5, name)
    assert_tensors(tmp_path / "out", expected_final(tensors, vec_weight=0.5))


# The real CLI in a subprocess. Finished tensors are journaled one at a time (instead of about
# every second) and each journal entry is followed by a short pause, so that the kill reliably
# lands while the last step is under way; the data path is untouched.
RUNNER = """
import functools, sys, time
import mergekitlite.api as api
import mergekitlite.output as output
assert hasattr(api, "ExecContext"), "test hook: mergekitlite.api no longer uses ExecContext"
api.ExecContext = functools.partial(api.ExecContext, journal_every_s=0.0)
_record = output.PartialOutput.record
def record(self, names, synced):
    _record(self, names, synced)
    time.sleep(0.02)
output.PartialOutput.record = record
from mergekitlite.cli import merge_main
sys.exit(merge_main(sys.argv[1:]))
"""


def test_interrupted_last_step_resumes_to_the_same_bits(fam, tensors, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(two_step(fam))
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(recipe), str(out), "-j", "1", "--no-hash"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
    )
    deadline = time.monotonic() + 120
    while not journal_done(partial):
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the merge ended (exit {proc.returncode}) before step 2 journaled a tensor:\n{output}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("step 2 made no progress in time")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and partial.is_dir()
    inter = tmp_path / "out.steps" / "chatvec"
    assert (inter / "model.safetensors").is_file(), "step 1 should have finished before step 2 started"
    before = mtimes(inter)
    done = journal_done(partial)
    assert 0 < len(done) < len(tensors["base"])

    code = merge_main([str(recipe), str(out), "--resume", "-j", "1", "--no-hash"])
    stdout = capsys.readouterr().out.replace("\n", " ")
    assert code == 0, stdout
    assert "up to date" in stdout and f"+{len(done)} resumed" in stdout
    assert mtimes(inter) == before
    assert not partial.exists()
    assert_tensors(out, expected_final(tensors))


STEP_ERRORS = {
    "unnamed": (
        "merge_method: task_vector\nbase_model: {base}\nmodels:\n  - model: {chat}\n---\n"
        "merge_method: add_delta\nbase_model: {cpt}\nmodels:\n  - model: chatvec\n",
        [(1, "merge_method: task_vector", "step 1 of 2 needs a 'name'")],
    ),
    "duplicate": (
        "name: vec\nmerge_method: task_vector\nbase_model: {base}\nmodels:\n  - model: {chat}\n---\n"
        "name: vec\nmerge_method: task_vector\nbase_model: {base}\nmodels:\n  - model: {cpt}\n---\n"
        "merge_method: add_delta\nbase_model: {cpt}\nmodels:\n  - model: vec\n",
        [(2, "name: vec", "name: 'vec' is already the name of step 1")],
    ),
    "later": (
        "name: first\nmerge_method: add_delta\nbase_model: {cpt}\nmodels:\n  - model: second\n---\n"
        "name: second\nmerge_method: task_vector\nbase_model: {base}\nmodels:\n  - model: {chat}\n---\n"
        "merge_method: linear\nmodels:\n  - model: first\n    parameters: {{weight: 1.0}}\n",
        [(1, "model: second", "step 1 uses 'second', which is made by a later step")],
    ),
}


def doc_lines(text: str, step: int) -> range:
    """1-based line numbers of the ``step``-th YAML document of ``text``."""
    starts = [1] + [i + 2 for i, line in enumerate(text.splitlines()) if line == "---"]
    ends = [s - 2 for s in starts[1:]] + [len(text.splitlines())]
    return range(starts[step - 1], ends[step - 1] + 1)


@pytest.mark.parametrize("case", sorted(STEP_ERRORS))
def test_step_errors_have_positions(fam, tmp_path, capsys, case):
    template, wanted = STEP_ERRORS[case]
    text = template.format(**fam)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(RecipeError) as exc:
        load_recipes(recipe)
    code = main(["validate", str(recipe)])
    err = "".join(capsys.readouterr())
    assert code == 2
    for step, _snippet, message in wanted:
        lines = [p for p in exc.value.problems if message in p]
        assert len(lines) == 1, exc.value.problems
        prefix, _, _ = lines[0].partition(f": {message[:12]}")
        file, line, col = prefix.rsplit(":", 2)
        assert file == str(recipe) and col.isdigit(), lines[0]
        assert int(line) in doc_lines(text, step), f"{lines[0]}: not a position in step {step}"
        assert lines[0] in err


def test_plan_and_dry_run_before_the_intermediate_exists(fam, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "pipe.yaml"
    recipe.write_text(two_step(fam))

    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "step 1/2: chatvec" in out and "step 2/2: final" in out
    assert "plan: task_vector" in out, "step 1 can be planned now"
    assert "planned when chatvec exist(s)" in out and "plan: add_delta" not in out

    assert merge_main([str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "planned when chatvec exist(s)" in out and "dry run: nothing written" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.yaml"]

    # Once step 1 has run (default output merged/pipe, steps in merged/pipe.steps), both are planned.
    assert merge_main([str(recipe), "--no-hash"]) == 0
    assert (tmp_path / "merged" / "pipe.steps" / "chatvec" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "plan: task_vector" in out and "plan: add_delta" in out and "planned when" not in out


def test_plan_steps_plans_what_it_can_and_says_what_it_waits_for(fam, tmp_path):
    """One API function plans every step of a file: step 2 waits for step 1's output until it exists."""
    import mergekitlite

    recipe = tmp_path / "pipe.yaml"
    recipe.write_text(two_step(fam))
    out = tmp_path / "out"
    first, second = mergekitlite.plan_steps(recipe, out, MergeOptions())
    assert (first.index, first.count, first.name, first.last) == (0, 2, "chatvec", False)
    assert first.output == tmp_path / "out.steps" / "chatvec" and first.waits_for == () and first.uses == ()
    assert first.plan is not None and first.plan.recipe.merge_method == "task_vector"
    assert (second.name, second.last, second.output) == ("final", True, out)
    assert second.uses == ("chatvec",) and second.waits_for == ("chatvec",) and second.plan is None
    with pytest.raises(RecipeError, match=r"has 2 steps; plan them with mergekitlite\.plan_steps"):
        mergekitlite.plan_merge(recipe)

    run_merge(recipe, out, MergeOptions(hash_inputs=False))
    first, second = mergekitlite.plan_steps(recipe, out, MergeOptions())
    assert second.waits_for == () and second.uses == ("chatvec",)
    assert second.plan is not None and second.plan.recipe.merge_method == "add_delta"
    assert second.plan.sources["chatvec"].path.resolve() == first.output.resolve()


def test_plan_json_of_a_pipeline(fam, tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "pipe.yaml"
    recipe.write_text(two_step(fam))
    assert main(["plan", str(recipe), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["waits_for"]) for s in data["steps"]] == [("chatvec", []), (None, ["chatvec"])]
    assert data["steps"][0]["plan"]["tensors"] and data["steps"][1]["plan"] is None
