"""Fuzzing the header readers: a checkpoint that another reader would refuse is never read.

Every field of a small valid safetensors file is mutated (offsets, dtypes, shapes, ``__metadata__``,
JSON structure, the length prefix, the file's length, raw bytes). The property, for every mutant:
either the merge (a passthrough, which copies every tensor's bytes) exits 0 and its output holds
exactly, bit for bit, what the ``safetensors`` library reads from the mutant, or the merge exits 2 with
one line naming the file; never a traceback (exit 1), never exit 0 with other bytes, never beyond a
time or memory bound. Pickled ``.bin`` checkpoints get the same treatment, lighter, against
``torch.load(weights_only=True)``.

The default run is derandomized and short (``make test`` stays fast); ``MERGEKITLITE_FUZZ=long``
runs thousands of random examples per property (see the README's Development section).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickletools
import resource
import struct
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergekitlite.cli import merge_main
from mergekitlite.errors import CheckpointError
from mergekitlite.io.safetensors_header import KNOWN_CODES, read_header
from mergekitlite.io.torch_pickle import read_bin_index

settings.register_profile(
    "mergekitlite-default",
    max_examples=60,
    derandomize=True,  # the same examples on every run: the default suite never flakes
    deadline=None,  # the bound below is wall time per example, generous for a loaded machine
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile(
    "mergekitlite-long",
    parent=settings.get_profile("mergekitlite-default"),
    max_examples=3000,
    derandomize=False,
)
FUZZ = settings.get_profile(
    "mergekitlite-long" if os.environ.get("MERGEKITLITE_FUZZ") == "long" else "mergekitlite-default"
)

SECONDS_PER_EXAMPLE = 30.0  # a merge of this toy takes ~0.1 s: anything near this bound is a hang
RSS_GROWTH_BOUND = 512 * 1024 * 1024  # no header may make the reader allocate for what it claims
CONFIG = {"model_type": "toy"}


# ---------------------------------------------------------------- a small valid file


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _valid_parts() -> tuple[dict[str, Any], bytes]:
    """Header (tensor name → entry, plus ``__metadata__``) and data of a valid file: several dtypes, a
    scalar, an empty tensor, and the data laid out in another order than the header names them."""
    g = torch.Generator().manual_seed(7)
    tensors = {  # in data order
        "lm_head.weight": torch.randn(3, 6, generator=g),
        "scale": torch.tensor(1.5),
        "model.layers.1.weight": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 6),
        "model.norm.weight": torch.randn(6, generator=g).to(torch.float16),
        "model.layers.0.weight": torch.randn(4, 6, generator=g).to(torch.bfloat16),
        "model.position_ids": torch.arange(5, dtype=torch.int64),
    }
    codes = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
    entries, data = {}, b""
    for name, t in tensors.items():
        raw = raw_bytes(t)
        entries[name] = {
            "dtype": codes[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return {"__metadata__": {"format": "pt"}, **dict(sorted(entries.items()))}, data


HEADER, DATA = _valid_parts()
NAMES = [k for k in HEADER if k != "__metadata__"]


def pack(header_text: bytes, data: bytes = DATA, *, pad: int = 0) -> bytes:
    body = header_text + b" " * pad
    return struct.pack("<Q", len(body)) + body + data


def dumps(header: Any) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


# ---------------------------------------------------------------- mutations

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)
near_int = st.one_of(
    st.integers(-3, len(DATA) + 3),
    st.integers(-(2**66), 2**66),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63)]),
)
number_like = st.one_of(near_int, st.floats(-1e20, 1e20), st.booleans(), st.text(max_size=3), st.none())
dtype_value = st.one_of(
    st.sampled_from(sorted(KNOWN_CODES)), st.sampled_from(["f32", "F32 ", "", "Q4_K", "float32"]), json_leaf
)
shape_value = st.one_of(st.lists(near_int, max_size=4), st.lists(number_like, max_size=4), json_value)
offsets_value = st.one_of(st.lists(near_int, min_size=2, max_size=2), st.lists(number_like, max_size=3), json_value)


@st.composite
def field_mutants(draw: st.DrawFn) -> bytes:
    header = json.loads(json.dumps(HEADER))
    name = draw(st.sampled_from(NAMES))
    entry = header[name]
    kind = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "drop", "extra"]))
    if kind == "dtype":
        entry["dtype"] = draw(dtype_value)
    elif kind == "shape":
        entry["shape"] = draw(shape_value)
    elif kind == "data_offsets":
        entry["data_offsets"] = draw(offsets_value)
    elif kind == "entry":
        header[name] = draw(json_value)
    elif kind == "drop":
        del entry[draw(st.sampled_from(sorted(entry)))]
    else:
        entry[draw(st.text(max_size=6))] = draw(json_value)
    return pack(dumps(header))


@st.composite
def layout_mutants(draw: st.DrawFn) -> bytes:
    """Offsets moved, swapped or shared between tensors (overlaps, holes), dtypes swapped for ones of
    the same size (a valid file again), shapes reshaped to the same byte count."""
    header = json.loads(json.dumps(HEADER))
    a, b = draw(st.sampled_from(NAMES)), draw(st.sampled_from(NAMES))
    kind = draw(st.sampled_from(["shift", "swap", "share", "same_size_dtype", "reshape"]))
    if kind == "shift":
        i = draw(st.integers(0, 1))
        header[a]["data_offsets"][i] += draw(st.integers(-9, 9))
    elif kind == "swap":
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    elif kind == "share":
        header[a]["data_offsets"] = list(header[b]["data_offsets"])
    elif kind == "same_size_dtype":
        size = {"BF16": ["F16", "I16", "U16"], "F16": ["BF16", "I16"], "F32": ["I32", "U32"], "I64": ["F64", "U64"]}
        header[a]["dtype"] = draw(st.sampled_from(size.get(header[a]["dtype"], ["U8"])))
    else:
        n = 1
        for d in header[a]["shape"]:
            n *= d
        header[a]["shape"] = draw(st.sampled_from([[n], [1, n], [n, 1], [0, n], [n, 0], [2, max(n // 2, 0)]]))
    return pack(dumps(header))


@st.composite
def json_mutants(draw: st.DrawFn) -> bytes:
    kind = draw(
        st.sampled_from(["metadata", "duplicate", "deep", "deep_value", "not_object", "constant", "surrogate", "bytes"])
    )
    header = json.loads(json.dumps(HEADER))
    if kind == "metadata":
        header["__metadata__"] = draw(json_value)
        return pack(dumps(header))
    if kind == "duplicate":
        name = draw(st.sampled_from([*NAMES, "__metadata__"]))
        text = dumps(header).decode()
        entry = json.dumps(header[name], separators=(",", ":"))
        other = json.dumps(header[draw(st.sampled_from(NAMES))], separators=(",", ":"))
        twin = draw(st.sampled_from([entry, other]))
        return pack(text[:-1].encode() + f",{json.dumps(name)}:{twin}}}".encode())
    if kind == "deep":
        depth = draw(st.integers(50, 200_000))
        return pack(b"[" * depth + b"]" * depth)
    if kind == "deep_value":
        depth = draw(st.integers(50, 100_000))
        nested = "[" * depth + "]" * depth
        text = dumps(header).decode()
        return pack(
            text[:-1].encode() + f',"x":{{"dtype":"F32","shape":[],"data_offsets":[0,0],"y":{nested}}}}}'.encode()
        )
    if kind == "not_object":
        return pack(dumps(draw(json_value)))
    if kind == "constant":
        name = draw(st.sampled_from(NAMES))
        text = (
            dumps(header).decode().replace(json.dumps(header[name]["data_offsets"]).replace(" ", ""), "[NaN,Infinity]")
        )
        return pack(text.encode())
    if kind == "surrogate":
        text = dumps(header).decode().replace('"scale"', '"sc\\ud800ale"')
        return pack(text.encode())
    raw = bytearray(dumps(header))
    raw[draw(st.integers(0, len(raw) - 1))] = draw(st.sampled_from([0x80, 0xC0, 0xFF, 0xFE, 0xED]))
    return pack(bytes(raw))


@st.composite
def length_mutants(draw: st.DrawFn) -> bytes:
    """The length prefix, padding, and the file's own length."""
    good = dumps(HEADER)
    kind = draw(st.sampled_from(["prefix", "pad", "truncate", "extend", "tiny"]))
    if kind == "prefix":
        n = draw(
            st.one_of(st.integers(0, 2**64 - 1), st.integers(len(good) - 8, len(good) + 8).filter(lambda x: x >= 0))
        )
        return struct.pack("<Q", n) + good + DATA
    if kind == "pad":  # spaces after the JSON are valid
        return pack(good, pad=draw(st.integers(0, 64)))
    if kind == "truncate":
        return pack(good)[: -draw(st.integers(1, len(DATA) + len(good)))]
    if kind == "extend":
        return pack(good) + bytes(draw(st.integers(1, 64)))
    return draw(st.binary(max_size=16))


@st.composite
def byte_mutants(draw: st.DrawFn) -> bytes:
    """Raw bytes of the length prefix or header overwritten."""
    raw = bytearray(pack(dumps(HEADER)))
    end = 8 + len(dumps(HEADER))
    for _ in range(draw(st.integers(1, 4))):
        raw[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


mutants = st.one_of(field_mutants(), layout_mutants(), json_mutants(), length_mutants(), byte_mutants())


# ---------------------------------------------------------------- the property


def _merge(model: Path, out: Path) -> tuple[int, str]:
    recipe = model.parent / "r.yaml"
    recipe.write_text(f"merge_method: passthrough\nmodels:\n  - model: {model}\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = merge_main([str(recipe), str(out), "--no-hash", "-q", "-j", "1"])
    return code, stderr.getvalue() + stdout.getvalue()


def _library_reads(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return load_file(path)
    except Exception:  # the library refuses the file (or torch cannot hold one of its dtypes)
        return None


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_merge_matches_library(content: bytes, filename: str = "model.safetensors") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "m"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(CONFIG))
        path = model / filename
        path.write_bytes(content)
        out = Path(tmp) / "out"
        rss, started = _peak_rss(), time.monotonic()
        code, text = _merge(model, out)
        elapsed = time.monotonic() - started
        assert elapsed < SECONDS_PER_EXAMPLE, f"the merge took {elapsed:.1f} s"
        assert _peak_rss() - rss < RSS_GROWTH_BOUND, "the merge's memory grew with what the header claims"
        if code == 0:
            expected = _library_reads(path)
            assert expected is not None, f"merged a file the safetensors library refuses:\n{text}"
            got = load_file(out / "model.safetensors")
            assert sorted(got) == sorted(expected)
            for name, tensor in expected.items():
                assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
                assert raw_bytes(got[name]) == raw_bytes(tensor), name
        else:
            assert code == 2, f"exit {code}:\n{text}"
            lines = [ln for ln in text.splitlines() if ln.strip()]
            assert len(lines) == 1 and str(path) in lines[0], text
            assert not out.exists() and not Path(f"{out}.partial").exists()


def test_the_valid_file_and_its_layout_merge_exactly():
    """The unmutated file (data stored in another order than the names') merges; a guard that the
    property is not vacuously satisfied by refusing everything."""
    check_merge_matches_library(pack(dumps(HEADER)))
    tensors, metadata = read_header_of(pack(dumps(HEADER)))
    assert metadata == {"format": "pt"} and set(tensors) == set(NAMES)


def read_header_of(content: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(content)
        return read_header(path)


@FUZZ
@given(mutants)
def test_mutated_safetensors_merge_exactly_or_exit_2(content):
    check_merge_matches_library(content)


@FUZZ
@given(st.one_of(field_mutants(), layout_mutants(), json_mutants(), length_mutants(), byte_mutants()))
def test_reader_is_at_least_as_strict_as_the_library(content):
    """Straight at the reader, many more mutants per second: whatever the library refuses, we refuse
    with a CheckpointError; whatever we accept, we locate exactly where the library does."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(content)
        expected = _library_reads(path)
        try:
            tensors, _ = read_header(path)
        except CheckpointError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
            return
        assert expected is not None, "accepted a file the safetensors library refuses"
        assert set(tensors) == set(expected)
        raw = path.read_bytes()
        for name, info in tensors.items():
            assert raw[info.begin : info.end] == raw_bytes(expected[name]), name


# ---------------------------------------------------------------- pickled .bin checkpoints


def _bin_bytes() -> bytes:
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(6, 4, generator=g)
    sd = {
        "model.layers.0.q.weight": qkv[:3],  # a view at a non-zero storage offset
        "model.layers.0.k.weight": qkv[3:],
        "model.norm.weight": torch.randn(4, generator=g).to(torch.bfloat16),
        "model.position_ids": torch.arange(4),
    }
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


BIN = _bin_bytes()


def _with_member(suffix: str, content: bytes) -> bytes:
    """The checkpoint with one member replaced (CRCs recomputed: the zip itself stays valid; what the
    merge must get right is the tensors, not the archive's checksums)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(BIN)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = content if info.filename.endswith(suffix) else src.read(info)
            dst.writestr(info.filename, data)
    return out.getvalue()


def _pickle() -> bytes:
    with zipfile.ZipFile(io.BytesIO(BIN)) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))


PKL = _pickle()
PKL_OPS = list(pickletools.genops(PKL))


@st.composite
def pickle_mutants(draw: st.DrawFn) -> bytes:
    pkl = bytearray(PKL)
    kind = draw(st.sampled_from(["int", "global", "bytes", "cut"]))
    if kind == "int":  # shapes, strides, storage offsets and sizes are small ints in the pickle
        ints = [(pos, op.name) for op, arg, pos in PKL_OPS if op.name in ("BININT1", "BININT2")]
        pos, name = draw(st.sampled_from(ints))
        width = 1 if name == "BININT1" else 2
        pkl[pos + 1 : pos + 1 + width] = draw(st.integers(0, 256**width - 1)).to_bytes(width, "little")
    elif kind == "global":
        gl = [(pos, arg) for op, arg, pos in PKL_OPS if op.name == "GLOBAL"]
        pos, arg = draw(st.sampled_from(gl))
        repl = draw(
            st.sampled_from(
                [
                    "os system",
                    "builtins eval",
                    "torch FloatStorage",
                    "torch._utils _rebuild_parameter",
                    "collections OrderedDict",
                    "torch device",
                ]
            )
        )
        old = ("c" + arg.replace(" ", "\n") + "\n").encode()
        pkl[pos : pos + len(old)] = ("c" + repl.replace(" ", "\n") + "\n").encode()
    elif kind == "bytes":
        for _ in range(draw(st.integers(1, 3))):
            pkl[draw(st.integers(0, len(pkl) - 1))] = draw(st.integers(0, 255))
    else:
        del pkl[draw(st.integers(0, len(pkl) - 1)) :]
    return _with_member("/data.pkl", bytes(pkl))


byteorder_mutants = st.builds(
    functools.partial(_with_member, "/byteorder"),
    st.one_of(st.sampled_from([b"little", b"big", b"", b"LITTLE", b"little\n"]), st.binary(max_size=8)),
)


@FUZZ
@given(st.one_of(pickle_mutants(), byteorder_mutants))
def test_mutated_bin_merges_exactly_or_exit_2(content):
    """The pickle (which the allow-list guards) and the byte order record are mutated; the zip
    container itself stays valid (its checksums are not what the merge reads)."""
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "m"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(CONFIG))
        path = model / "pytorch_model.bin"
        path.write_bytes(content)
        out = Path(tmp) / "out"
        code, text = _merge(model, out)
        if code == 0:
            expected = torch.load(path, weights_only=True, map_location="cpu")
            got = load_file(out / "model.safetensors")
            assert sorted(got) == sorted(k for k, v in expected.items() if isinstance(v, torch.Tensor))
            for name, tensor in got.items():
                want = expected[name].contiguous()
                assert tensor.dtype == want.dtype and tensor.shape == want.shape, name
                assert raw_bytes(tensor) == raw_bytes(want), name
        else:
            assert code == 2, f"exit {code}:\n{text}"
            lines = [ln for ln in text.splitlines() if ln.strip()]
            assert len(lines) == 1 and str(path) in lines[0], text


def test_valid_bin_merges_exactly():
    check = test_mutated_bin_merges_exactly_or_exit_2.hypothesis.inner_test
    check(BIN)


@pytest.mark.parametrize("depth", [129, 5000, 10**6])
def test_deep_json_is_refused_without_recursing(depth, tmp_path):
    path = tmp_path / "deep.safetensors"
    path.write_bytes(pack(b"[" * depth + b"]" * depth))
    with pytest.raises(CheckpointError, match=str(path)):
        read_header(path)


def test_reading_a_header_reads_no_weights(tmp_path):
    """Header only, the library's second opinion included (it maps the file and touches only the
    header): a few KB read and no page of the 64 MB of weights faulted in."""
    proc_io = Path("/proc/self/io")
    if not proc_io.is_file():
        pytest.skip("/proc/self/io is not available")

    def rchar() -> int:
        return next(int(ln.split()[1]) for ln in proc_io.read_text().splitlines() if ln.startswith("rchar:"))

    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(16 * 1024 * 1024), "n": torch.ones(8)}, str(path))
    read_header(path)  # imports done
    reads, faults = rchar(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors, _ = read_header(path)
    reads, faults = rchar() - reads, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert tensors["w"].nbytes == 64 * 1024 * 1024
    assert reads < 64 * 1024, f"read {reads} bytes"
    assert faults < 64, f"{faults} page faults: weights were touched"


def test_pickle_protocol_4_reads_and_protocol_5_buffers_are_refused(tmp_path):
    """torch.save(..., pickle_protocol=4) is read like the default; a BYTEARRAY8 (protocol 5) with a
    forged length, which makes the interpreter's own unpickler allocate what it claims, is refused by
    the opcode walk before any unpickling."""
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    torch.save(sd, tmp_path / "p4.bin", pickle_protocol=4)
    info = read_bin_index(tmp_path / "p4.bin")["w"]
    assert info.shape == (2, 3) and info.dtype == "F32" and info.nbytes == 24
    cpu = PKL.index(b"cpu") + 3  # after the storage location string
    forged = PKL[:cpu] + b"\x96" + PKL[cpu:]  # BYTEARRAY8, its 8-byte length taken from whatever follows
    honest = PKL[:cpu] + b"\x96" + (1).to_bytes(8, "little") + b"x" + PKL[cpu:]
    for name, pkl in (("forged", forged), ("honest", honest)):
        (tmp_path / f"{name}.bin").write_bytes(_with_member("/data.pkl", pkl))
    with pytest.raises(
        CheckpointError, match=r"forged\.bin: a corrupt checkpoint index \(data\.pkl: expected \d+ bytes"
    ):
        read_bin_index(tmp_path / "forged.bin")
    with pytest.raises(CheckpointError, match=r"honest\.bin: its data\.pkl uses the pickle opcode BYTEARRAY8"):
        read_bin_index(tmp_path / "honest.bin")
