"""Pickled ``pytorch_model*.bin`` inputs: read lazily (byte ranges from the pickle's index, no
weights loaded), safely (an allow-list unpickler: a malicious pickle is refused before anything
runs), and to the same bits as the same weights stored as safetensors."""

from __future__ import annotations

import json
import os
import shlex
import zipfile
from pathlib import Path

import builders
import pytest
import torch
from builders import assert_bitwise, load_tensors, ref_task_arithmetic

from mergekitlite import MergeOptions, run_merge
from mergekitlite.cli import merge_main
from mergekitlite.errors import CheckpointError
from mergekitlite.io import files as io_files
from mergekitlite.io.torch_pickle import read_bin_index
from mergekitlite.sources import index_model

CONFIG = {"model_type": "toy", "num_hidden_layers": 2, "tie_word_embeddings": True}
WEIGHTS = {"a": 0.6, "b": 0.9}
SHARD_1 = ("model.embed_tokens.weight", "lm_head.weight", "model.position_ids")


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A toy checkpoint as torch would hold it: lm_head shares the embedding's storage (tied),
    q/k are views into one fused qkv storage (non-zero storage offset), bf16, float32 and an
    int64 tensor."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    emb = torch.randn(32, 8, generator=g).to(torch.bfloat16)
    sd["model.embed_tokens.weight"] = emb
    sd["lm_head.weight"] = emb  # the tied pair: one storage, two names
    sd["model.position_ids"] = torch.arange(16, dtype=torch.int64).reshape(1, 16) * (seed + 1)
    for i in range(2):
        p = f"model.layers.{i}."
        qkv = torch.randn(24, 8, generator=g)  # float32
        sd[p + "self_attn.q_proj.weight"] = qkv[:8]
        sd[p + "self_attn.k_proj.weight"] = qkv[8:16]
        sd[p + "self_attn.v_proj.weight"] = qkv[16:]
        sd[p + "mlp.up_proj.weight"] = torch.randn(12, 8, generator=g).to(torch.bfloat16)
        sd[p + "input_layernorm.weight"] = torch.randn(8, generator=g)
    return sd


def write_st(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    # safetensors refuses shared storage: every tensor gets its own copy.
    return builders.write_safetensors_model(folder, {k: v.clone() for k, v in sd.items()}, CONFIG)


def write_bin(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def write_sharded_bin(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    names = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
    parts = [{k: v for k, v in sd.items() if k in SHARD_1}, {k: v for k, v in sd.items() if k not in SHARD_1}]
    weight_map = {}
    for name, part in zip(names, parts, strict=True):
        torch.save(part, folder / name)
        weight_map |= {k: name for k in part}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


WRITERS = {"st": write_st, "bin": write_bin, "sharded": write_sharded_bin}


@pytest.fixture(scope="module")
def bin_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """{format: {"base"|"a"|"b": folder}} - the same weights in every format."""
    root = tmp_path_factory.mktemp("bin-models")
    out: dict[str, dict[str, Path]] = {fmt: {} for fmt in WRITERS}
    for role, seed in (("base", 1), ("a", 2), ("b", 3)):
        sd = state_dict(seed)
        for fmt, writer in WRITERS.items():
            out[fmt][role] = writer(root / fmt / role, sd)
    return out


def ta_recipe(models: dict[str, Path]) -> str:
    return (
        "merge_method: task_arithmetic\n"
        f"base_model: {models['base']}\n"
        "models:\n"
        f"  - model: {models['a']}\n    parameters: {{weight: {WEIGHTS['a']}}}\n"
        f"  - model: {models['b']}\n    parameters: {{weight: {WEIGHTS['b']}}}\n"
    )


def test_bin_layouts_are_indexed_as_stored(bin_models):
    """Byte ranges from the pickle: the tied pair points at the same bytes, views at their offsets."""
    idx = read_bin_index(bin_models["bin"]["base"] / "pytorch_model.bin")
    sd = state_dict(1)
    assert set(idx) == set(sd)
    emb, head = idx["model.embed_tokens.weight"], idx["lm_head.weight"]
    assert (emb.begin, emb.end) == (head.begin, head.end)
    q, k, v = (idx[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    assert k.begin == q.end and v.begin == k.end and v.end - q.begin == 24 * 8 * 4
    codes = {name: info.dtype for name, info in idx.items()}
    assert codes["model.embed_tokens.weight"] == "BF16"
    assert codes["model.position_ids"] == "I64"
    assert codes["model.layers.1.self_attn.v_proj.weight"] == "F32"
    raw = (bin_models["bin"]["base"] / "pytorch_model.bin").read_bytes()
    for name, info in idx.items():
        expected = sd[name].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        assert raw[info.begin : info.end] == expected, name


@pytest.mark.parametrize("fmt", ["bin", "sharded", "mixed"])
def test_bin_inputs_merge_like_safetensors(bin_models, tmp_path, monkeypatch, fmt):
    """The merge of .bin inputs is bit for bit the merge of the same weights as safetensors, and the
    formula's value; inputs are read in chunk-sized byte ranges, each byte of a tensor once."""
    models = (
        {"base": bin_models["sharded"]["base"], "a": bin_models["bin"]["a"], "b": bin_models["st"]["b"]}
        if fmt == "mixed"
        else bin_models[fmt]
    )
    (tmp_path / "st.yaml").write_text(ta_recipe(bin_models["st"]))
    (tmp_path / "bin.yaml").write_text(ta_recipe(models))
    run_merge(tmp_path / "st.yaml", tmp_path / "st", MergeOptions(hash_inputs=False))

    reads: list[tuple[str, int]] = []
    real = io_files.InputFiles.read_into

    def spy(self, info, start, out):
        reads.append((info.file.name, len(out)))
        return real(self, info, start, out)

    monkeypatch.setattr(io_files.InputFiles, "read_into", spy)
    result = run_merge(tmp_path / "bin.yaml", tmp_path / "bin", MergeOptions(hash_inputs=False))
    monkeypatch.setattr(io_files.InputFiles, "read_into", real)
    assert sum(n for _, n in reads) == result.plan.bytes_read
    assert any(name.endswith(".bin") for name, _ in reads)

    got, want = load_tensors(tmp_path / "bin"), load_tensors(tmp_path / "st")
    assert set(got) == set(want) == set(state_dict(0))
    for name in want:
        assert_bitwise(got[name], want[name], name)

    base, a, b = state_dict(1), state_dict(2), state_dict(3)
    for name, actual in got.items():
        if name == "model.position_ids":  # not floating point: copied from the base
            assert_bitwise(actual, base[name], name)
            continue
        exp = ref_task_arithmetic(base[name], [a[name], b[name]], [WEIGHTS["a"], WEIGHTS["b"]])
        assert_bitwise(actual, exp.to(base[name].dtype), name)


def test_folder_with_both_formats_uses_safetensors(tmp_path):
    both = write_st(tmp_path / "both", state_dict(5))
    torch.save(state_dict(6), both / "pytorch_model.bin")  # different weights in the .bin
    src = index_model("both", both)
    assert [p.name for p in src.weight_files] == ["model.safetensors"]
    assert {i.file.name for i in src.tensors.values()} == {"model.safetensors"}

    (tmp_path / "r.yaml").write_text(f"merge_method: passthrough\nmodels:\n  - model: {both}\n")
    run_merge(tmp_path / "r.yaml", tmp_path / "out", MergeOptions(hash_inputs=False))
    got, st, other = load_tensors(tmp_path / "out"), state_dict(5), state_dict(6)
    for name in st:
        assert_bitwise(got[name], st[name].contiguous(), name)
    assert not torch.equal(got["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _assert_nothing_written(root: Path, before: set[str]) -> None:
    assert {p.name for p in root.iterdir()} == before


def test_malicious_pickle_is_refused_before_it_runs(bin_models, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil"
    evil.mkdir()
    sd: dict[str, object] = dict(state_dict(2))
    sd["payload"] = _Evil(marker)
    torch.save(sd, evil / "pytorch_model.bin")
    (evil / "config.json").write_text(json.dumps(CONFIG))

    recipe = tmp_path / "r.yaml"
    recipe.write_text(ta_recipe({**bin_models["st"], "a": evil}))
    before = {p.name for p in tmp_path.iterdir()}
    code = merge_main([str(recipe), str(tmp_path / "out"), "--no-hash"])
    err = "".join(capsys.readouterr())
    culprit = f"{os.system.__module__}.{os.system.__name__}"  # posix.system
    assert code == 2, err
    assert str(evil / "pytorch_model.bin") in err
    assert f"'{culprit}'" in err and "refusing to unpickle" in err
    assert not marker.exists(), "the pickle's payload ran"
    _assert_nothing_written(tmp_path, before)

    with pytest.raises(CheckpointError, match=culprit):
        read_bin_index(evil / "pytorch_model.bin")
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler does run it (so the refusal above mattered).
    torch.load(evil / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def _legacy(path: Path) -> None:
    torch.save(state_dict(2), path, _use_new_zipfile_serialization=False)


def _compressed(path: Path) -> None:
    torch.save(state_dict(2), path.with_suffix(".tmp"))
    with zipfile.ZipFile(path.with_suffix(".tmp")) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    path.with_suffix(".tmp").unlink()


@pytest.mark.parametrize(("make", "expected"), [(_legacy, "legacy (pre-zip)"), (_compressed, "compressed")])
def test_unreadable_bin_formats_give_clear_errors(bin_models, tmp_path, capsys, make, expected):
    model = tmp_path / "m"
    model.mkdir()
    make(model / "pytorch_model.bin")
    (model / "config.json").write_text(json.dumps(CONFIG))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ta_recipe({**bin_models["st"], "b": model}))
    before = {p.name for p in tmp_path.iterdir()}
    code = merge_main([str(recipe), str(tmp_path / "out"), "--no-hash"])
    err = "".join(capsys.readouterr())
    assert code == 2, err
    assert str(model / "pytorch_model.bin") in err and expected in err
    assert "Traceback" not in err
    _assert_nothing_written(tmp_path, before)


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise OSError("no rchar")


def test_indexing_a_large_bin_reads_only_its_index(tmp_path):
    """The index of a 128 MB checkpoint comes from its pickle and zip headers: a few KB read."""
    try:
        _rchar()
    except OSError:
        pytest.skip("/proc/self/io is not available")
    big = tmp_path / "pytorch_model.bin"
    sd = {"model.embed_tokens.weight": torch.zeros(32 * 1024 * 1024), "model.norm.weight": torch.ones(8)}
    torch.save(sd, big)
    size = big.stat().st_size
    assert size > 128 * 1000**2
    before = _rchar()
    idx = read_bin_index(big)
    read = _rchar() - before
    assert idx["model.embed_tokens.weight"].end - idx["model.embed_tokens.weight"].begin == 128 * 1024 * 1024
    assert read < 1024 * 1024, f"indexing read {read} bytes of a {size}-byte file"
