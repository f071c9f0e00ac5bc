"""Fault injection: the environment misbehaves, and the merge says so in one line (exit 2), leaves
nothing behind that the next run would misread, and the next run does the right thing.

* environment: unreadable inputs and unwritable outputs (as a user without root's override, where
  the platform allows), a file where a folder should be, a full disk at every write site (weights,
  journal, config, tokenizer, card, provenance, hash cache), broken ``config.json`` and indexes,
  dangling symlinks;
* two merges into one output: the second is refused naming the first's pid and the lock; a lock left
  by a killed merge does not block;
* inputs changed under a resume (same size, mtime put back): refused before the output is finalised;
* messages that used to mislead.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import builders
import pytest
import torch
from builders import assert_bitwise, load_tensors, ref_task_arithmetic, subprocess_env

import mergekitlite.api as api
from mergekitlite.cli import merge_main
from mergekitlite.execute import ExecContext
from mergekitlite.io.files import ShardFile
from mergekitlite.io.lock import PathLock

WEIGHTS = (0.5, 0.75)
JOURNAL = "mergekitlite-journal.jsonl"


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    """A llama family whose 'b' has a tokenizer, chat template and generation config (side files to
    copy and rewrite)."""
    root = tmp_path_factory.mktemp("faults")
    family = builders.make_family(root, "llama", seed=41)
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    builders.make_tokenizer(family["b"], chat_template=template, eos="<|im_end|>", generation_eos_id=3)
    return family


def recipe_text(fam: dict[str, Path], a: Path | None = None) -> str:
    return (
        "merge_method: task_arithmetic\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {a or fam['a']}\n    parameters: {{weight: {WEIGHTS[0]}}}\n"
        f"  - model: {fam['b']}\n    parameters: {{weight: {WEIGHTS[1]}}}\n"
        f"tokenizer_source: {fam['b']}\n"
        "dtype: bfloat16\n"
    )


@pytest.fixture
def recipe(fam, tmp_path) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(fam))
    return path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_merged(out: Path, base: Path, a: Path, b: Path) -> None:
    got = load_tensors(out)
    tb, ta, tbb = load_tensors(base), load_tensors(a), load_tensors(b)
    assert set(got) == set(tb)
    for name, actual in got.items():
        exp = ref_task_arithmetic(tb[name], [ta[name], tbb[name]], list(WEIGHTS)).to(torch.bfloat16)
        assert_bitwise(actual, exp, name)


def cli(capsys, recipe: Path, out: Path, *args: str) -> tuple[int, str]:
    code = merge_main([str(recipe), str(out), "-j", "1", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def error_line(text: str) -> str:
    """The one error line of a failed run (and there must be exactly one, without a traceback)."""
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


def assert_no_output(out: Path) -> None:
    assert not out.exists(), f"{out} exists after a failed merge"
    assert not out.with_name(out.name + ".lock").exists(), "the lock file was left behind"


def journal_entries(partial: Path) -> list[dict]:
    entries = []
    for line in (partial / JOURNAL).read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


# ---------------------------------------------------------------- permissions, as a non-root user

# Runs several merges in one interpreter (one torch import), with root's permission override
# dropped when run as root: every argument is a JSON list of merge arguments; prints [code, output]
# per merge as JSON lines.
PERMISSION_RUNNER = """
import contextlib, io, json, sys
probe = sys.argv[1]
try:
    open(probe).read()
    print(json.dumps("override"))
    sys.exit(0)
except PermissionError:
    pass
from mergekitlite.cli import merge_main
for arg in sys.argv[2:]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = merge_main(json.loads(arg))
    print(json.dumps([code, buf.getvalue()]))
"""

_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


def _drop_root_override() -> None:
    """In the child, before exec: without these capabilities root obeys file permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)


def run_without_permission_override(tmp_path: Path, *merges: list[str]) -> list[tuple[int, str]]:
    probe = tmp_path / "probe"
    probe.write_text("secret")
    probe.chmod(0)
    as_root = os.geteuid() == 0
    if as_root and not sys.platform.startswith("linux"):
        pytest.skip("running as root, and root's permission override can only be dropped on Linux here")
    proc = subprocess.run(
        [sys.executable, "-c", PERMISSION_RUNNER, str(probe), *(json.dumps(m) for m in merges)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        preexec_fn=_drop_root_override if as_root else None,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if lines == ["override"]:
        pytest.skip("this process can read files without read permission (root with CAP_DAC_OVERRIDE kept)")
    return [(code, text) for code, text in lines]


def test_permission_denied_on_inputs_and_output(fam, tmp_path):
    """An unreadable weights file, an input folder that cannot be listed, an output folder that
    cannot be written: exit 2, one line naming the path and what to do, nothing written."""
    unreadable = copy_model(fam["a"], tmp_path / "a-unreadable")
    (unreadable / "model.safetensors").chmod(0)
    closed = copy_model(fam["a"], tmp_path / "a-closed")
    closed.chmod(0)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    recipes = {}
    for name, model in (("unreadable", unreadable), ("closed", closed), ("ok", fam["a"])):
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(recipe_text(fam, model))
    outs = [tmp_path / "out1", tmp_path / "out2", readonly / "out"]
    try:
        results = run_without_permission_override(
            tmp_path,
            [str(recipes["unreadable"]), str(outs[0]), "--no-hash"],
            [str(recipes["closed"]), str(outs[1]), "--no-hash"],
            [str(recipes["ok"]), str(outs[2]), "--no-hash"],
        )
    finally:
        closed.chmod(0o755)
        readonly.chmod(0o755)
    (code, text), (code2, text2), (code3, text3) = results

    assert code == 2, text
    line = error_line(text)
    assert f"{unreadable / 'model.safetensors'}: Permission denied" in line and "readable" in line
    assert_no_output(outs[0])

    assert code2 == 2, text2
    line = error_line(text2)
    assert str(closed) in line and "Permission denied" in line and "readable" in line
    assert_no_output(outs[1])

    assert code3 == 2, text3
    line = error_line(text3)
    assert str(readonly) in line and "Permission denied" in line and "writable" in line
    assert list(readonly.iterdir()) == []


# ---------------------------------------------------------------- files where folders should be, and the reverse


def test_output_parent_is_a_file(recipe, tmp_path, capsys):
    (tmp_path / "f").write_text("a file")
    code, text = cli(capsys, recipe, tmp_path / "f" / "out", "--no-hash")
    assert code == 2, text
    line = error_line(text)
    assert f"{tmp_path / 'f'} is a file, not a folder" in line and "choose another output path" in line
    assert (tmp_path / "f").read_text() == "a file"


@pytest.mark.parametrize("resume", [False, True])
def test_partial_that_is_a_file_is_not_called_an_interrupted_merge(fam, recipe, tmp_path, capsys, resume):
    (tmp_path / "out.partial").write_text("not ours")
    code, text = cli(capsys, recipe, tmp_path / "out", "--no-hash", *(["--resume"] if resume else []))
    assert code == 2, text
    line = error_line(text)
    assert (
        f"{tmp_path / 'out.partial'} is in the way: it is not a folder" in line
        and "interrupted merge is in" not in line
    )
    assert (tmp_path / "out.partial").read_text() == "not ours"
    assert_no_output(tmp_path / "out")
    (tmp_path / "out.partial").unlink()
    code, text = cli(capsys, recipe, tmp_path / "out", "--no-hash")
    assert code == 0, text
    assert_merged(tmp_path / "out", fam["base"], fam["a"], fam["b"])


def test_partial_folder_without_journal_is_not_resumed(recipe, tmp_path, capsys):
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "notes.txt").write_text("mine")
    code, text = cli(capsys, recipe, tmp_path / "out", "--no-hash", "--resume")
    assert code == 2, text
    line = error_line(text)
    assert "has no merge journal" in line and str(tmp_path / "out.partial") in line
    assert (tmp_path / "out.partial" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"[1, 2]", "a JSON list, not an object"), (b"\xff\xfe{}", "not UTF-8"), (b'{"a": ', "invalid JSON")],
)
def test_broken_config_json(fam, tmp_path, capsys, content, expected):
    a = copy_model(fam["a"], tmp_path / "a")
    (a / "config.json").write_bytes(content)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(fam, a))
    code, text = cli(capsys, recipe, tmp_path / "out", "--no-hash")
    assert code == 2, text
    line = error_line(text)
    assert str(a / "config.json") in line and expected in line
    assert_no_output(tmp_path / "out")
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("escape", ["absolute", "parent"])
def test_index_naming_a_shard_outside_the_model_folder(fam, tmp_path, capsys, escape):
    """An index that points outside its folder (at another model's weights here, which would merge
    'fine' and silently wrong) is refused."""
    a = copy_model(fam["a"], tmp_path / "a")
    outside = tmp_path / "elsewhere.safetensors"
    (a / "model.safetensors").rename(outside)
    names = load_tensors(fam["a"]).keys()
    shard = str(outside) if escape == "absolute" else "../elsewhere.safetensors"
    (a / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(fam, a))
    code, text = cli(capsys, recipe, tmp_path / "out", "--no-hash")
    assert code == 2, text
    line = error_line(text)
    assert (
        str(a / "model.safetensors.index.json") in line
        and repr(shard) in line
        and "not a file of the model folder" in line
    )
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("indexed", [False, True])
def test_dangling_symlink_as_a_shard(fam, tmp_path, capsys, indexed):
    a = copy_model(fam["a"], tmp_path / "a")
    gone = tmp_path / "gone.safetensors"
    (a / "model.safetensors").unlink()
    link = a / ("model-00001-of-00001.safetensors" if indexed else "model.safetensors")
    link.symlink_to(gone)
    if indexed:
        names = load_tensors(fam["a"]).keys()
        (a / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, link.name)}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(fam, a))
    code, text = cli(capsys, recipe, tmp_path / "out", "--no-hash")
    assert code == 2, text
    line = error_line(text)
    assert link.name in line and f"symbolic link to {gone}, which does not exist" in line
    assert "cache" not in line
    assert_no_output(tmp_path / "out")


def test_dangling_blob_in_the_hub_cache_is_called_incomplete(fam, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snap = builders.add_to_hub_cache(cache, "tiny-org/a", fam["a"])
    os.unlink(os.path.realpath(snap / "model.safetensors"))  # the blob; the snapshot's link dangles
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(fam, Path("tiny-org/a")).replace(f"model: {Path('tiny-org/a')}", "model: tiny-org/a"))
    code, text = cli(capsys, recipe, tmp_path / "out", "--no-hash")
    assert code == 2, text
    line = error_line(text)
    assert "is in the Hugging Face cache but incomplete" in line and "not in the Hugging Face cache" not in line
    assert "model.safetensors (a symbolic link to" in line


# ---------------------------------------------------------------- a full disk at every write site


class FullDisk:
    """Records writes (file objects opened for writing, os.write/pwrite/sendfile, posix_fallocate) and
    fails the ``at``-th write for which ``where(path)`` holds with ENOSPC, as a full disk does: an
    OSError without a file name. Counting per site keeps the threads' interleaving out of it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, where=lambda path: False, at: int = 1):
        self.where, self.at, self.count = where, at, 0
        self.sites: list[str] = []
        self.failed: str | None = None
        self._lock = threading.Lock()
        real_open = io.open

        def opener(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return _Writes(f, self, str(file)) if any(c in mode for c in "wax+") else f

        def wrap_fd(fn):
            def wrapped(fd, *args, **kwargs):  # the file written to is the first argument of each
                self.hit(_fd_path(fd))
                return fn(fd, *args, **kwargs)

            return wrapped

        monkeypatch.setattr(io, "open", opener)
        monkeypatch.setattr("builtins.open", opener)
        for name in ("write", "pwrite", "sendfile", "posix_fallocate"):
            if hasattr(os, name):
                monkeypatch.setattr(os, name, wrap_fd(getattr(os, name)))

    def hit(self, path: str) -> None:
        with self._lock:
            self.sites.append(path)
            if self.failed is None and self.where(path):
                self.count += 1
                if self.count == self.at:
                    self.failed = path
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


class _Writes:
    def __init__(self, f, disk: FullDisk, path: str):
        self._f, self._disk, self._path = f, disk, path

    def write(self, data):
        self._disk.hit(self._path)
        return self._f.write(data)

    def writelines(self, lines):
        self._disk.hit(self._path)
        return self._f.writelines(lines)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def assert_same_files(out: Path, reference: Path) -> None:
    """Every file as in an undisturbed merge (the provenance's creation time aside)."""
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for ref in reference.iterdir():
        got = out / ref.name
        if ref.name == "mergekitlite.json":
            a, b = json.loads(got.read_text()), json.loads(ref.read_text())
            a.pop("created"), b.pop("created")
            assert a == b
        else:
            assert got.read_bytes() == ref.read_bytes(), ref.name


def test_enospc_at_every_write_site_then_resume(fam, recipe, tmp_path, monkeypatch, capsys, _isolated_cache):
    """An undisturbed merge lists every file written; then, for each (and in the middle of the
    weights), a merge whose disk fills up right there: exit 2 with one line, no output, and a
    ``--resume`` with space again gives the exact merge, every file as the undisturbed one. Where a
    write is only a convenience (the hash cache, the pid in the lock file), the merge succeeds instead,
    with a note for the cache."""
    monkeypatch.setattr(api, "ExecContext", functools.partial(ExecContext, journal_every_s=0.0))
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    args = ["--shard-size", "8KB"]  # several shards and an index

    def site(path: str) -> str:
        p = Path(path)
        if p == tmp_path / "out.lock":
            return "lock"
        if _isolated_cache in p.parents:
            return "hash cache"
        return p.name if p.parent == partial else path

    with monkeypatch.context() as m:
        disk = FullDisk(m)
        code, text = cli(capsys, recipe, out, *args)
    assert code == 0, text
    reference = out.rename(tmp_path / "reference")
    writes = [site(p) for p in disk.sites]
    sites = set(writes)
    expected = {"lock", "hash cache", JOURNAL, "config.json", "tokenizer.json", "tokenizer_config.json"}
    expected |= {"generation_config.json", "model.safetensors.index.json", "README.md", "mergekitlite.json"}
    expected |= {"mergekit_config.yml", "model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"}
    assert expected <= sites, f"write sites not seen: {expected - sites}"
    shard_writes = sum(1 for s in writes if s.endswith(".safetensors"))
    cases = [(s, 1) for s in sorted(sites)] + [("*.safetensors", shard_writes // 2)]

    for target, at in cases:
        with monkeypatch.context() as m:

            def matches(path: str, target: str = target) -> bool:
                return site(path) == target or (target == "*.safetensors" and path.endswith(".safetensors"))

            disk = FullDisk(m, matches, at)
            code, text = cli(capsys, recipe, out, *args)
        assert disk.failed is not None, f"{target}: write {at} was never reached"
        if target in ("lock", "hash cache"):
            assert code == 0, f"{target}: {text}"
            if target == "hash cache":
                assert "input-hash cache" in text and "could not be written" in text
        else:
            assert code == 2, f"{target}: {text}"
            line = error_line(text)
            assert "No space left on device" in line or "disk is full" in line, line
            # Writes while the tensors are merged (shards, journal) name the partial folder, others their file.
            assert str(partial) in line if target.endswith(".safetensors") or target == JOURNAL else target in line
            assert not out.exists()
            if partial.is_dir():  # a merge to continue, and the message says how
                assert "--resume" in line, line
                code, text = cli(capsys, recipe, out, *args, "--resume")
            else:  # the disk was full before the partial output had a journal: none was left
                assert "--resume" not in line, line
                code, text = cli(capsys, recipe, out, *args)
            assert code == 0, f"after {target}: {text}"
        assert not partial.exists()
        assert not (tmp_path / "out.lock").exists()
        assert_merged(out, fam["base"], fam["a"], fam["b"])
        assert_same_files(out, reference)
        shutil.rmtree(out)


def test_enospc_in_side_files_after_a_resume_rewrites_them_all(fam, recipe, tmp_path, monkeypatch, capsys):
    """A resume removes side files that an earlier attempt wrote (in part, or with other options):
    after a failure while copying the tokenizer, a resume with --no-copy-tokenizer has none."""
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    real = api.write_side_files

    def fail_after_tokenizer(plan, folder, **kwargs):
        real(plan, folder, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "README.md"))

    monkeypatch.setattr(api, "write_side_files", fail_after_tokenizer)
    code, text = cli(capsys, recipe, out, "--no-hash")
    assert code == 2 and (partial / "tokenizer.json").is_file(), text
    monkeypatch.setattr(api, "write_side_files", real)
    code, text = cli(capsys, recipe, out, "--no-hash", "--resume", "--no-copy-tokenizer")
    assert code == 0, text
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
    assert_merged(out, fam["base"], fam["a"], fam["b"])


def test_resume_after_a_torn_journal_line(fam, recipe, tmp_path, monkeypatch, capsys):
    """A journal line cut short (a full disk or a kill in the middle of an append): the resume keeps
    what came before it, starts on a fresh line, and what it journals itself counts on the next resume."""
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    with monkeypatch.context() as m:
        interrupt_at_write(m, 5)
        code, text = cli(capsys, recipe, out, "--no-hash")
    assert code == 130, text
    done = builders.journal_done(partial)
    with open(partial / JOURNAL, "a") as f:
        f.write('{"done": "model.layers.2.mlp')  # torn: no closing quote, brace or newline
    with monkeypatch.context() as m:
        interrupt_at_write(m, 5)
        code, text = cli(capsys, recipe, out, "--no-hash", "--resume")
    assert code == 130, text
    lines = (partial / JOURNAL).read_text().splitlines()
    torn = next(i for i, ln in enumerate(lines) if ln.endswith("mlp"))
    assert json.loads(lines[torn + 1]).keys() == {"boot_id"}, "the resume did not start on a new line"
    more = {json.loads(ln)["done"] for ln in lines[torn + 1 :] if '"done"' in ln}
    assert more and not more & done
    code, text = cli(capsys, recipe, out, "--no-hash", "--resume")
    assert code == 0, text
    assert f"+{len(done | more)} resumed" in text.replace("\n", " ")
    assert_merged(out, fam["base"], fam["a"], fam["b"])


# ---------------------------------------------------------------- two merges into one output

# The merge command, held up after its first chunks while the file ``gate`` exists (the data path is
# untouched, every finished tensor is journaled at once): a second merge can be tried while it runs,
# however loaded the machine.
GATED_RUNNER = """
import functools, pathlib, sys, threading, time
import mergekitlite.api as api
import mergekitlite.execute as execute
api.ExecContext = functools.partial(api.ExecContext, journal_every_s=0.0)
gate, process, count, lock = pathlib.Path(sys.argv[1]), execute._process, [0], threading.Lock()
def gated_process(*args, **kwargs):
    with lock:
        count[0] += 1
        held = count[0] > 2
    while held and gate.exists():
        time.sleep(0.01)
    return process(*args, **kwargs)
execute._process = gated_process
from mergekitlite.cli import merge_main
sys.exit(merge_main(sys.argv[2:]))
"""


def start_gated(recipe: Path, out: Path, gate: Path) -> subprocess.Popen[str]:
    gate.write_text("held")
    return subprocess.Popen(
        [sys.executable, "-c", GATED_RUNNER, str(gate), str(recipe), str(out), "-j", "1", "--no-hash"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
    )


def wait_for_lock(proc: subprocess.Popen[str], lock: Path, partial: Path) -> None:
    """Until the merge holds its lock (its pid in the file) and has journaled a tensor."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the first merge ended (exit {proc.returncode}) before it was seen holding its lock")
        try:
            if lock.read_text().strip() == str(proc.pid) and builders.journal_done(partial):
                return
        except OSError:
            pass
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the first merge did not take its lock in time")


def test_second_merge_into_the_same_output_is_refused(fam, recipe, tmp_path, capsys):
    out, lock, partial, gate = tmp_path / "out", tmp_path / "out.lock", tmp_path / "out.partial", tmp_path / "gate"
    proc = start_gated(recipe, out, gate)
    try:
        wait_for_lock(proc, lock, partial)
        for extra in ((), ("--resume",), ("--overwrite",)):
            code, text = cli(capsys, recipe, out, "--no-hash", *extra)
            assert code == 2, text
            line = error_line(text)
            assert f"another merge (pid {proc.pid}) is writing {out}" in line and str(lock) in line, line
        assert proc.poll() is None, "the first merge did not wait at its gate"
        gate.unlink()
        stdout, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout
    assert not lock.exists() and not partial.exists()
    assert_merged(out, fam["base"], fam["a"], fam["b"])


def test_lock_of_a_killed_merge_does_not_block(fam, recipe, tmp_path, capsys):
    """kill -9 leaves OUT.lock behind with a dead pid in it: the kernel released the lock with the
    process, and the next merge (here, the resume) takes it and finishes."""
    out, lock, partial = tmp_path / "out", tmp_path / "out.lock", tmp_path / "out.partial"
    proc = start_gated(recipe, out, tmp_path / "gate")
    wait_for_lock(proc, lock, partial)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert lock.read_text().strip() == str(proc.pid)
    code, text = cli(capsys, recipe, out, "--no-hash", "--resume")
    assert code == 0, text
    assert "resumed" in text
    assert not lock.exists() and not partial.exists()
    assert_merged(out, fam["base"], fam["a"], fam["b"])


def test_pid_in_an_unlocked_lock_file_is_not_a_holder(fam, recipe, tmp_path, capsys):
    (tmp_path / "out.lock").write_text("1\n")  # pid 1 is alive, but holds no lock on this file
    code, text = cli(capsys, recipe, tmp_path / "out", "--no-hash")
    assert code == 0, text
    assert_merged(tmp_path / "out", fam["base"], fam["a"], fam["b"])


def test_intermediate_step_output_is_locked_too(fam, tmp_path, capsys):
    recipe = tmp_path / "two.yaml"
    recipe.write_text(
        "name: vec\nmerge_method: task_vector\n"
        f"base_model: {fam['base']}\nmodels:\n  - model: {fam['b']}\nout_dtype: float32\n---\n"
        f"merge_method: add_delta\nbase_model: {fam['a']}\nmodels:\n  - model: vec\ndtype: bfloat16\n"
    )
    step = tmp_path / "out.steps" / "vec"
    step.parent.mkdir()
    with PathLock(step.with_name("vec.lock"), step):
        code, text = cli(capsys, recipe, tmp_path / "out", "--no-hash")
    assert code == 2, text
    line = error_line(text)
    assert f"pid {os.getpid()}" in line and f"is writing {step}" in line
    assert not (tmp_path / "out").exists()
    code, text = cli(capsys, recipe, tmp_path / "out", "--no-hash")
    assert code == 0, text


# ---------------------------------------------------------------- inputs changed under a resume


def test_the_sameness_rule():
    """Contents are proven the same when one identity was seen throughout, or when every identity
    seen has a digest and the digests agree; only past identities without a digest are lost for good."""
    from mergekitlite.io.identity import lost_for_good, unproven

    assert unproven(["i1", "i1", "i1"], {}) is None
    assert unproven(["i1", "i2"], {"i1": "a" * 64, "i2": "a" * 64}) is None
    assert "contents changed" in unproven(["i1", "i2"], {"i1": "a" * 64, "i2": "b" * 64})
    assert "not every version" in unproven(["i1", "i2"], {"i1": "a" * 64})
    assert "not every version" in unproven(["i1", "i2", "i1"], {"i1": "a" * 64})
    assert lost_for_good(["i1"], {}, "i1") is None
    assert lost_for_good(["i1"], {"i1": "a" * 64}, "i2") is None  # i2 can still be hashed now
    assert "never hashed" in lost_for_good(["i1"], {}, "i2")
    assert "never hashed" in lost_for_good(["i1", "i2"], {"i1": "a" * 64}, "i3")


def rewrite_in_place(path: Path, offset_from_end: int = 64) -> None:
    """Change some bytes of a weights file, keeping its size and putting its mtime (and atime) back:
    what a careless copy over the file, or ``touch -d``, leaves behind."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size - offset_from_end)
        old = f.read(8)
        f.seek(st.st_size - offset_from_end)
        f.write(bytes(b ^ 0x5A for b in old))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def interrupt_at_write(monkeypatch, n: int) -> None:
    """Ctrl-C after ``n`` chunk writes (every finished tensor journaled at once)."""
    monkeypatch.setattr(api, "ExecContext", functools.partial(ExecContext, journal_every_s=0.0))
    real, count, lock = ShardFile.write, [0], threading.Lock()

    def write(self, name, start, data):
        with lock:
            count[0] += 1
            if count[0] > n:
                raise KeyboardInterrupt
        return real(self, name, start, data)

    monkeypatch.setattr(ShardFile, "write", write)


@pytest.fixture
def own_family(fam, tmp_path) -> dict[str, Path]:
    """Copies of the family, whose files a test may change."""
    return {k: copy_model(v, tmp_path / "fam" / k) for k, v in fam.items()}


def test_input_rewritten_before_resume_is_refused(own_family, tmp_path, monkeypatch, capsys):
    f = own_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(f))
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    with monkeypatch.context() as m:
        interrupt_at_write(m, 5)
        code, text = cli(capsys, recipe, out, "--no-hash")
    assert code == 130 and partial.is_dir(), text
    rewrite_in_place(f["a"] / "model.safetensors")

    code, text = cli(capsys, recipe, out, "--no-hash", "--resume")
    assert code == 2, text
    line = error_line(text)
    assert f"{f['a'] / 'model.safetensors'} changed since the partial output was started" in line
    assert f"delete {partial}" in line and "without --resume" in line
    assert not out.exists()
    # With hashing on, the same: the old contents were never hashed, nothing can prove them equal.
    code, text = cli(capsys, recipe, out, "--resume")
    assert code == 2 and "changed since the partial output was started" in error_line(text), text

    shutil.rmtree(partial)  # as the message says
    code, text = cli(capsys, recipe, out, "--no-hash")
    assert code == 0, text
    assert_merged(out, f["base"], f["a"], f["b"])


def test_input_changed_after_its_hash_was_recorded_is_refused(own_family, tmp_path, monkeypatch, capsys):
    """The first attempt hashed the inputs and got as far as the model card; then a file changed in
    place. Every tensor is already written, but the output is not finalised."""
    f = own_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(f))
    out, partial = tmp_path / "out", tmp_path / "out.partial"

    _interrupted_before_the_card(monkeypatch, capsys, recipe, out)
    recorded = [e["hashes"] for e in journal_entries(partial) if "hashes" in e]
    assert recorded and str(f["b"] / "model.safetensors") in recorded[0]
    rewrite_in_place(f["b"] / "model.safetensors")

    code, text = cli(capsys, recipe, out, "--resume")
    assert code == 2, text
    line = error_line(text)
    assert f"{f['b'] / 'model.safetensors'} changed since the partial output was started" in line
    assert "its contents changed (sha256" in line
    assert not out.exists() and partial.is_dir()


def _interrupted_before_the_card(monkeypatch, capsys, recipe: Path, out: Path, *args: str) -> None:
    """A first attempt that wrote every tensor (and, when hashing, recorded the digests), then stopped."""

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(api, "write_card", interrupted)
        code, text = cli(capsys, recipe, out, *args)
    assert code == 130, text


@pytest.mark.parametrize(
    ("first", "resume", "proven"),
    [((), (), True), ((), ("--no-hash",), True), (("--no-hash",), (), False)],
    ids=["hashed-then-hashed", "hashed-then-no-hash", "never-hashed"],
)
def test_metadata_only_change_before_resume(own_family, tmp_path, monkeypatch, capsys, first, resume, proven):
    """chmod moves a file's ctime, not its contents. With the digests of the first attempt recorded,
    the resume proves the contents equal (hashing the changed file even under --no-hash) and finishes;
    without them nothing can prove it, and the resume is refused."""
    f = own_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(f))
    out = tmp_path / "out"
    _interrupted_before_the_card(monkeypatch, capsys, recipe, out, *first)
    (f["a"] / "model.safetensors").chmod(0o600)
    code, text = cli(capsys, recipe, out, "--resume", *resume)
    if proven:
        assert code == 0, text
        assert_merged(out, f["base"], f["a"], f["b"])
    else:
        assert code == 2, text
        line = error_line(text)
        assert f"{f['a'] / 'model.safetensors'} changed since the partial output was started" in line
        assert "never hashed" in line and not out.exists()


def test_input_changed_while_merging_is_refused(own_family, tmp_path, monkeypatch, capsys):
    f = own_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(f))
    real = api.run_tasks

    def run_then_change(*args, **kwargs):
        merged = real(*args, **kwargs)
        rewrite_in_place(f["base"] / "model.safetensors")
        return merged

    monkeypatch.setattr(api, "run_tasks", run_then_change)
    code, text = cli(capsys, recipe, tmp_path / "out", "--no-hash")
    assert code == 2, text
    assert f"{f['base'] / 'model.safetensors'} changed while the merge ran" in error_line(text)
    assert not (tmp_path / "out").exists()


def test_hash_cache_is_not_fooled_by_a_restored_mtime(own_family, tmp_path, capsys):
    f = own_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(f))
    code, text = cli(capsys, recipe, tmp_path / "out1")
    assert code == 0, text
    rewrite_in_place(f["a"] / "model.safetensors")
    code, text = cli(capsys, recipe, tmp_path / "out2")
    assert code == 0, text
    import hashlib

    fresh = hashlib.sha256((f["a"] / "model.safetensors").read_bytes()).hexdigest()
    prov = json.loads((tmp_path / "out2" / "mergekitlite.json").read_text())
    assert prov["inputs"][str(f["a"])]["files"]["model.safetensors"] == fresh
    old = json.loads((tmp_path / "out1" / "mergekitlite.json").read_text())
    assert old["inputs"][str(f["a"])]["files"]["model.safetensors"] != fresh


# ---------------------------------------------------------------- messages that used to mislead


@pytest.mark.parametrize("flag", [["-j", "0"], ["-j", "-3"], ["--num-threads", "0"]])
def test_thread_count_below_one_is_refused_as_such(recipe, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        merge_main([str(recipe), str(tmp_path / "out"), "--no-hash", *flag])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    name = "-j/--threads" if flag[0] == "-j" else flag[0]
    assert f"argument {name}: must be at least 1 (got {flag[1]})" in err and "memory" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("flag", ["--shard-size", "--max-ram", "--max-vram", "--out-shard-size"])
def test_negative_sizes_are_refused(recipe, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        merge_main([str(recipe), str(tmp_path / "out"), "--no-hash", f"{flag}=-1"])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be more than 0 (got -1)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_negative_offsets_are_called_what_they_are(fam, tmp_path, capsys):
    a = copy_model(fam["a"], tmp_path / "a")
    path = a / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [-(end - begin), 0]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(fam, a))
    code, out = cli(capsys, recipe, tmp_path / "out", "--no-hash")
    assert code == 2, out
    line = error_line(out)
    assert f"{path}: tensor {name!r}: data_offsets [{-(end - begin)}, 0] is not a pair of non-negative integers" in line
    assert "spans" not in line


def test_disk_precheck_says_what_it_compares(recipe, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    from mergekitlite.api import plan_merge

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("mergekitlite.output.shutil.disk_usage", lambda p: usage(10**9, 10**9 - 5000, 5000))
    weights = plan_merge(recipe).bytes_written
    code, text = cli(capsys, recipe, tmp_path / "out", "--no-hash")
    assert code == 2, text
    line = error_line(text)
    from mergekitlite.budget import human

    assert f"the merge writes {human(weights)} of weights and needs 67.1 MB more for its other files" in line
    assert "but 5.0 KB are free" in line
    assert_no_output(tmp_path / "out")


def test_valid_file_with_an_empty_tensor_merges(tmp_path, capsys):
    """A zero-row tensor used to be refused as not fitting in memory."""
    t = {"w": torch.randn(4, 3), "empty": torch.zeros(0, 3)}
    m = builders.write_safetensors_model(tmp_path / "m", t, {"model_type": "toy"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {m}\n    parameters: {{weight: 1.0}}\n")
    code, text = cli(capsys, recipe, tmp_path / "out", "--no-hash")
    assert code == 0, text
    got = load_tensors(tmp_path / "out")
    assert got["empty"].shape == (0, 3)
    assert_bitwise(got["w"], t["w"], "w")
