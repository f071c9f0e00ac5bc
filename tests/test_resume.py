"""Interrupting a merge and resuming it: ``OUT`` never exists half-written, ``OUT.partial`` keeps
the finished tensors, ``--resume`` finishes the job bit for bit as an uninterrupted merge would,
and a partial output is never silently reused or resumed for a different recipe."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import builders
import pytest
import torch
from builders import journal_done, subprocess_env

from mergekitlite import MergeOptions, run_merge
from mergekitlite.cli import merge_main

JOURNAL = "mergekitlite-journal.jsonl"
N_LAYERS = 12

# Runs the real CLI entry point. The executor journals finished tensors about every second; a
# ~300 MB merge takes about that long, so the hook journals after every finished tensor instead
# (``journal_every_s=0``), and with a cadence given also fsyncs every ``cadence`` bytes instead of
# every ``sync_every_bytes`` (1 GiB by default). Each chunk also takes 5 ms longer: the whole merge
# then lasts seconds, not ~1 s, so that a signal sent once the journal lists a tensor lands mid-merge
# even when the test process is descheduled for a while on a busy machine.
RUNNER = """
import functools, signal, sys, time
# A shell that starts a job in the background (CI runners, `cmd &`) makes it ignore SIGINT, and
# Python then installs no KeyboardInterrupt handler: restore the interactive default.
signal.signal(signal.SIGINT, signal.default_int_handler)
cadence = sys.argv[1]
import mergekitlite.api as api
import mergekitlite.execute as execute
assert hasattr(api, "ExecContext"), "test hook: mergekitlite.api no longer uses ExecContext"
extra = {} if cadence == "default" else {"sync_every_bytes": int(cadence)}
api.ExecContext = functools.partial(api.ExecContext, journal_every_s=0.0, **extra)
process = execute._process
def slow_process(*args, **kwargs):
    time.sleep(0.005)
    return process(*args, **kwargs)
execute._process = slow_process
from mergekitlite.cli import merge_main
sys.exit(merge_main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def big_family(tmp_path_factory) -> dict[str, Path]:
    """Three ~100 MB bf16 checkpoints of 1 MB tensors (about 300 MB read per merge)."""
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    base = {}
    for i in range(N_LAYERS):
        for k in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj", "extra"):
            base[f"model.layers.{i}.{k}.weight"] = torch.randn(512, 1024, generator=g).to(torch.bfloat16)
    base["model.embed_tokens.weight"] = torch.randn(2048, 1024, generator=g).to(torch.bfloat16)
    base["model.norm.weight"] = torch.randn(1024, generator=g).to(torch.bfloat16)
    cfg = {"model_type": "toy", "num_hidden_layers": N_LAYERS, "dtype": "bfloat16"}
    fam = {"base": builders.write_safetensors_model(root / "base", base, cfg)}
    # Cheap, distinct children (generating 200 MB more of random numbers would dominate the test).
    a = {k: (v * 1.01).to(torch.bfloat16) for k, v in base.items()}
    fam["a"] = builders.write_safetensors_model(root / "a", a, cfg)
    fam["b"] = builders.write_safetensors_model(root / "b", {k: v.flip(0) for k, v in base.items()}, cfg)
    return fam


def recipe_text(fam: dict[str, Path], weight_b: float = 0.25) -> str:
    return (
        "merge_method: task_arithmetic\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {fam['a']}\n    parameters:\n      weight: [0.5, 1.0]\n"
        f"  - model: {fam['b']}\n    parameters:\n      weight: {weight_b}\n"
        "dtype: bfloat16\n"
        "compute_dtype: float64\n"
    )


@pytest.fixture(scope="module")
def reference_output(big_family, tmp_path_factory) -> Path:
    """The same merge, uninterrupted."""
    root = tmp_path_factory.mktemp("big-ref")
    recipe = root / "r.yaml"
    recipe.write_text(recipe_text(big_family))
    run_merge(recipe, root / "out", MergeOptions(hash_inputs=False))
    return root / "out"


def start(recipe: Path, out: Path, *args: str, cadence: str = "default") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, cadence, str(recipe), str(out), "-j", "1", "--no-hash", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
    )


def interrupt_after_progress(
    proc: subprocess.Popen[str], partial: Path, sig: int, *, more_than: int = 0, timeout: float = 120
) -> set[str]:
    """Send ``sig`` once the journal lists more than ``more_than`` finished tensors; return them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(
                f"the merge ended (exit {proc.returncode}) before its journal listed more than {more_than} finished "
                f"tensor(s) (it had {len(journal_done(partial))}): nothing to resume from\n{out}"
            )
        done = journal_done(partial)
        if len(done) > more_than:
            proc.send_signal(sig)
            return done
        time.sleep(0.002)
    proc.kill()
    pytest.fail("the merge did not make progress in time")


def cli(capsys, recipe: Path, out: Path, *args: str) -> tuple[int, str]:
    """The merge command in this process (no interpreter start-up): exit code and output."""
    code = merge_main([str(recipe), str(out), "-j", "1", "--no-hash", *args])
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).replace("\n", " ")


def weight_files(folder: Path) -> dict[str, bytes]:
    names = sorted(p.name for p in folder.glob("*.safetensors")) + [
        p.name for p in folder.glob("model.safetensors.index.json")
    ]
    return {n: (folder / n).read_bytes() for n in names}


def assert_same_weights(out: Path, reference: Path) -> None:
    got, want = weight_files(out), weight_files(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted merge"
    # and tensor by tensor, for a readable failure if the files differ only in layout
    a, b = builders.load_tensors(out), builders.load_tensors(reference)
    assert set(a) == set(b)
    for k in b:
        builders.assert_bitwise(a[k], b[k], k)


def test_sigkill_then_resume(big_family, reference_output, tmp_path, capsys):
    """The real CLI, as a user runs it: kill -9 once some tensors are journaled, then --resume."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(big_family))
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    proc = start(recipe, out)
    done = interrupt_after_progress(proc, partial, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert partial.is_dir() and (partial / JOURNAL).is_file()
    total = len(builders.load_tensors(big_family["base"]))
    assert 0 < len(done) < total

    code, stdout = cli(capsys, recipe, out, "--resume")
    assert code == 0, stdout
    assert f"+{len(done)} resumed" in stdout
    assert not partial.exists() and not (out / JOURNAL).exists()
    assert_same_weights(out, reference_output)


def test_interrupt_refusals_and_resume(big_family, reference_output, tmp_path, capsys):
    """Ctrl-C (exit 130, says how to resume), a run without --resume is refused, a changed recipe
    is refused, a kill during the resumed run, and a final resume that completes the merge."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(big_family))
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"

    proc = start(recipe, out, cadence="1")
    done = interrupt_after_progress(proc, partial, signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout
    assert "--resume" in stdout
    assert not out.exists() and partial.is_dir()
    assert done <= journal_done(partial)

    # Without --resume: refused, the partial output left alone.
    before = {p.name: p.stat().st_mtime_ns for p in partial.iterdir()}
    code, stdout = cli(capsys, recipe, out)
    assert code == 2, stdout
    assert "--resume" in stdout and "out.partial" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in partial.iterdir()} == before
    assert not out.exists()

    # A different recipe cannot resume this partial output.
    changed = tmp_path / "changed.yaml"
    changed.write_text(recipe_text(big_family, weight_b=0.5))
    code, stdout = cli(capsys, changed, out, "--resume")
    assert code == 2, stdout
    assert "different recipe" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in partial.iterdir()} == before

    # Resume, and kill the resumed run once it has added to the journal.
    n = len(journal_done(partial))
    proc = start(recipe, out, "--resume", cadence="1")
    interrupt_after_progress(proc, partial, signal.SIGKILL, more_than=n)
    proc.wait(timeout=60)
    assert not out.exists() and partial.is_dir()

    resumed = len(journal_done(partial))
    code, stdout = cli(capsys, recipe, out, "--resume")
    assert code == 0, stdout
    assert f"+{resumed} resumed" in stdout
    assert not partial.exists()
    assert_same_weights(out, reference_output)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "mergekit_config.yml").read_text() == recipe.read_text()


def test_resume_without_partial_is_a_fresh_merge(llama_family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(llama_family))
    result = run_merge(recipe, tmp_path / "out", MergeOptions(resume=True, hash_inputs=False))
    assert result.tensors_resumed == 0
    run_merge(recipe, tmp_path / "ref", MergeOptions(hash_inputs=False))
    assert_same_weights(tmp_path / "out", tmp_path / "ref")


def test_partial_output_is_not_reused_after_inputs_change(tmp_path):
    """A partial output of the same recipe but with an input file changed since is refused."""
    fam = builders.make_family(tmp_path / "fam", "gpt2", seed=31, layers=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {fam['base']}\nmodels:\n"
        f"  - model: {fam['a']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {fam['b']}\n    parameters: {{weight: 1.0}}\n"
    )
    from mergekitlite.api import plan_merge
    from mergekitlite.errors import OutputError
    from mergekitlite.output import open_partial

    plan = plan_merge(recipe)
    open_partial((tmp_path / "out").resolve(), plan, resume=False, overwrite=False)  # as if killed at once
    assert (tmp_path / "out.partial").is_dir()
    builders.perturb(fam["base"], fam["a"], 32)  # rewrite a's weights in place
    with pytest.raises(OutputError, match="different recipe or different inputs"):
        run_merge(recipe, tmp_path / "out", MergeOptions(resume=True, hash_inputs=False))
