"""Hugging Face hub ids resolved from a local hub cache, offline: a fake cache in tmp with the
layout huggingface_hub writes (refs/, snapshots/, blobs/), ``HF_HUB_OFFLINE=1``, no network."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import builders
import pytest
import torch
from builders import add_to_hub_cache, load_tensors, ref_task_arithmetic, subprocess_env

from mergekitlite import MergeOptions, run_merge
from mergekitlite.cli import merge_main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, llama_family):
    """A hub cache holding 'tiny-org/base' (blobs layout, also at revision COMMIT and branch 'v1')
    and 'tiny-org/chat' (plain files); huggingface_hub pointed at it and offline. huggingface_hub
    reads its environment at import, so its constants are patched too."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "tiny-org/base", llama_family["base"], commit=COMMIT, refs=("main", "v1"))
    add_to_hub_cache(cache, "tiny-org/chat", llama_family["b"], blobs=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def hub_recipe(base_ref: str, chat_ref: str, local: Path) -> str:
    return (
        "merge_method: task_arithmetic\n"
        f"base_model: {base_ref}\n"
        "models:\n"
        f"  - model: {local}\n    parameters:\n      weight: 0.5\n"
        f"  - model: {chat_ref}\n    parameters:\n      weight: 0.75\n"
        f"tokenizer_source: {chat_ref}\n"
    )


def check_output(out: Path, fam: dict[str, Path]) -> None:
    got = load_tensors(out)
    base, a, b = (load_tensors(fam[k]) for k in ("base", "a", "b"))
    assert set(got) == set(base)
    for name, t in got.items():
        exp = ref_task_arithmetic(base[name], [a[name], b[name]], [0.5, 0.75]).to(torch.bfloat16)
        builders.assert_bitwise(t, exp, name)


@pytest.mark.parametrize("base_ref", ["tiny-org/base", f"tiny-org/base@{COMMIT}", "tiny-org/base@v1"])
def test_merge_from_hub_cache(hub_cache, llama_family, tmp_path, base_ref):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(hub_recipe(base_ref, "tiny-org/chat", llama_family["a"]))
    result = run_merge(recipe, tmp_path / "out")
    check_output(tmp_path / "out", llama_family)
    assert result.plan.sources[base_ref].from_hub
    snapshot = hub_cache / "models--tiny-org--base" / "snapshots" / COMMIT
    assert result.plan.sources[base_ref].path.resolve() == snapshot.resolve()

    prov = json.loads((tmp_path / "out" / "mergekitlite.json").read_text())
    for ref, folder in ((base_ref, llama_family["base"]), ("tiny-org/chat", llama_family["b"])):
        entry = prov["inputs"][ref]
        assert entry["from_hub"] is True
        want = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir() if f.is_file()}
        assert entry["files"] == want, ref
    assert prov["inputs"][str(llama_family["a"])]["from_hub"] is False
    card = (tmp_path / "out" / "README.md").read_text()
    front = card.split("---")[1]
    assert base_ref in front and "tiny-org/chat" in front and str(llama_family["a"]) not in front


def test_hub_id_not_in_cache(hub_cache, llama_family, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(hub_recipe("tiny-org/base", "tiny-org/not-downloaded", llama_family["a"]))
    code = merge_main([str(recipe), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "'tiny-org/not-downloaded'" in err
    assert "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE" in err
    assert "tiny-org/base'" not in err  # the model that is there is not reported
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_unknown_revision_not_in_cache(hub_cache, llama_family, tmp_path):
    from mergekitlite.errors import PlanError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(hub_recipe("tiny-org/base@v2", "tiny-org/chat", llama_family["a"]))
    with pytest.raises(PlanError, match=r"tiny-org/base@v2.*not in the Hugging Face cache"):
        run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False))
    assert not (tmp_path / "out.partial").exists()


def test_hub_env_in_a_fresh_process(llama_family, tmp_path):
    """The environment variables alone (read by huggingface_hub at import) are enough."""
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "tiny-org/base", llama_family["base"])
    add_to_hub_cache(cache, "tiny-org/chat", llama_family["b"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(hub_recipe("tiny-org/base", "tiny-org/chat", llama_family["a"]))
    env = subprocess_env(HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"))
    cmd = [sys.executable, "-c", "import sys; from mergekitlite.cli import merge_main; sys.exit(merge_main())"]
    proc = subprocess.run(
        [*cmd, str(recipe), str(tmp_path / "out"), "-q"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    check_output(tmp_path / "out", llama_family)

    recipe.write_text(hub_recipe("tiny-org/base", "tiny-org/elsewhere", llama_family["a"]))
    proc = subprocess.run(
        [*cmd, str(recipe), str(tmp_path / "out2")], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 2
    err = " ".join(proc.stderr.split())  # undo any line wrapping
    assert "'tiny-org/elsewhere'" in err and "not in the Hugging Face cache" in err
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out2.partial").exists()
