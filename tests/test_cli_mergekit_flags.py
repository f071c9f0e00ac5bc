"""`merge` accepts mergekit-yaml's command-line options, so that a command copied from a model card
runs unchanged: the ones with an equivalent do what mergekit does, the ones that change nothing say
so, and the ones with no equivalent are refused with what to do instead, before anything is written."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import builders
import pytest
import torch
from safetensors import safe_open

from mergekitlite.cli import MERGEKIT_NO_OPS, main, merge_main


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """The llama family, with a chat tokenizer on the base (the donor by default)."""
    root = tmp_path_factory.mktemp("mk-flags")
    fam = builders.make_family(root, "llama", seed=4)
    builders.make_tokenizer(
        fam["base"], chat_template="{{ messages }}<|im_end|>", eos="<|im_end|>", generation_eos_id=3
    )
    return fam


def recipe(tmp_path: Path, fam: dict[str, Path]) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {fam['a']}\n    parameters:\n      weight: 0.5\n"
        f"  - model: {fam['b']}\n    parameters:\n      weight: 0.5\n"
        "dtype: bfloat16\n"
    )
    return p


def run(capsys, *argv: str) -> tuple[int, str]:
    code = merge_main([*argv, "--no-hash"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def shard_params(out: Path) -> list[tuple[int, int]]:
    """(parameters, tensors) of each output shard, read with safetensors."""
    sizes = []
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            names = list(sf.keys())
            sizes.append((sum(math.prod(sf.get_slice(k).get_shape()) for k in names), len(names)))
    return sizes


def test_a_copied_mergekit_command_runs(family, tmp_path, capsys):
    r = recipe(tmp_path, family)
    code, text = run(capsys, str(r), str(tmp_path / "ref"))
    assert code == 0, text
    limit = 2_000
    code, text = run(
        capsys,
        str(r),
        str(tmp_path / "out"),
        "--allow-crimes",
        "--lazy-unpickle",
        "--out-shard-size",
        "2K",
        "--copy-tokenizer",
        "--num-threads",
        "1",
        "--write-model-card",
        "-v",
    )
    assert code == 0, text
    for flag in ("--allow-crimes", "--lazy-unpickle", "--write-model-card"):
        assert f"note: {flag} has no effect" in text
    # Shards hold at most 2K parameters each, unless one tensor alone is larger; greedy in plan order.
    shards = shard_params(tmp_path / "out")
    assert len(shards) > 1
    for params, tensors in shards:
        assert params <= limit or tensors == 1, shards
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in (tmp_path / "out").glob("*.safetensors")}
    # Same tensors as the default run, bit for bit.
    a, b = builders.load_tensors(tmp_path / "out"), builders.load_tensors(tmp_path / "ref")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k


def test_no_copy_tokenizer_writes_no_tokenizer_but_keeps_stop_ids(family, tmp_path, capsys):
    r = recipe(tmp_path, family)
    code, text = run(capsys, str(r), str(tmp_path / "with"))
    assert code == 0, text
    assert "<|im_end|>" in (tmp_path / "with" / "tokenizer_config.json").read_text()
    code, text = run(capsys, str(r), str(tmp_path / "out"), "--no-copy-tokenizer")
    assert code == 0, text
    out = tmp_path / "out"
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
    assert "no tokenizer was written (--no-copy-tokenizer)" in text
    # The stop ids still come from the tokenizer donor (<|im_end|> = 3) and the config (</s> = 2).
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert eos == json.loads((tmp_path / "with" / "generation_config.json").read_text())["eos_token_id"]
    assert 3 in eos


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--transformers-cache", "/tmp/hf"], "--transformers-cache (a mergekit-yaml option): set HF_HUB_CACHE"),
    ],
)
def test_mergekit_options_without_an_equivalent_are_refused(family, tmp_path, capsys, flag, message):
    r = recipe(tmp_path, family)
    code, text = run(capsys, str(r), str(tmp_path / "out"), *flag)
    assert code == 2
    assert message in text
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_flag_without_a_gpu_is_a_clear_error(family, tmp_path, capsys):
    r = recipe(tmp_path, family)
    code, text = run(capsys, str(r), str(tmp_path / "out"), "--cuda")
    assert code == 2
    assert "--device cuda: no CUDA device is visible" in text
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_device_auto_falls_back_to_the_cpu(family, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("auto picks the GPU here")
    r = recipe(tmp_path, family)
    code, text = run(capsys, str(r), str(tmp_path / "out"), "--device", "auto")
    assert code == 0, text
    shutil.rmtree(tmp_path / "out")
    assert main(["plan", str(r), "--device", "auto"]) == 0
    assert "VRAM" not in capsys.readouterr().out


def test_every_no_op_flag_is_accepted(family, tmp_path, capsys):
    flags = ["--" + d.replace("_", "-") for d in MERGEKIT_NO_OPS]
    r = recipe(tmp_path, family)
    code, text = run(capsys, str(r), str(tmp_path / "out"), "--dry-run", *flags, "--no-write-model-card")
    assert code == 0, text
    for flag in flags:
        assert f"note: {flag} has no effect" in text
