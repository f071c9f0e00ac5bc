"""A full disk: too little free space is refused before anything is written; running out of space
while preallocating a shard or writing a tensor stops with exit 2, a message that says the disk
is full and how to continue, no ``OUT`` folder, and ``--resume`` after freeing space completes the
merge to the right bits."""

from __future__ import annotations

import errno
import functools
import os
import shutil
import threading
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from builders import assert_bitwise, load_tensors, ref_task_arithmetic

import mergekitlite.api as api
from mergekitlite import MergeOptions, run_merge
from mergekitlite.cli import merge_main
from mergekitlite.errors import OutputError
from mergekitlite.execute import ExecContext
from mergekitlite.io.files import ShardFile

WEIGHTS = (0.5, 0.75)
JOURNAL = "mergekitlite-journal.jsonl"
_Usage = namedtuple("_Usage", "total used free")


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture
def recipe(llama_family, tmp_path) -> Path:
    fam = llama_family
    path = tmp_path / "r.yaml"
    path.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {fam['base']}\n"
        "models:\n"
        f"  - model: {fam['a']}\n    parameters: {{weight: {WEIGHTS[0]}}}\n"
        f"  - model: {fam['b']}\n    parameters: {{weight: {WEIGHTS[1]}}}\n"
        "dtype: bfloat16\n"
    )
    return path


def assert_merged(out: Path, fam: dict[str, Path]) -> None:
    got = load_tensors(out)
    base, a, b = (load_tensors(fam[k]) for k in ("base", "a", "b"))
    assert set(got) == set(base)
    for name, actual in got.items():
        exp = ref_task_arithmetic(base[name], [a[name], b[name]], list(WEIGHTS)).to(torch.bfloat16)
        assert_bitwise(actual, exp, name)


def open_files_under(folder: Path) -> list[str]:
    """Files under ``folder`` this process still has open (Linux /proc)."""
    found = []
    fd_dir = Path("/proc/self/fd")
    for fd in os.listdir(fd_dir) if fd_dir.is_dir() else ():
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue
        if target.startswith(str(folder.resolve())):
            found.append(target)
    return found


def cli(capsys, recipe: Path, out: Path, *args: str) -> tuple[int, str]:
    code = merge_main([str(recipe), str(out), "-j", "1", "--no-hash", *args])
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).replace("\n", " ")


def test_not_enough_free_space_is_refused_before_writing(llama_family, recipe, tmp_path, monkeypatch, capsys):
    real = shutil.disk_usage
    seen: list[Path] = []

    def tiny(path):
        seen.append(Path(path))
        usage = real(path)
        return _Usage(usage.total, usage.total - 4096, 4096)

    monkeypatch.setattr("mergekitlite.output.shutil.disk_usage", tiny)
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(OutputError, match="not enough disk space"):
        run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False))
    code, text = cli(capsys, recipe, tmp_path / "out")
    assert code == 2, text
    assert "not enough disk space" in text and str(tmp_path) in text
    assert seen and all(p.resolve() == tmp_path.resolve() for p in seen), "free space looked up elsewhere"
    assert {p.name for p in tmp_path.iterdir()} == before, "something was written"

    monkeypatch.setattr("mergekitlite.output.shutil.disk_usage", real)  # enough space again
    run_merge(recipe, tmp_path / "out", MergeOptions(hash_inputs=False))
    assert_merged(tmp_path / "out", llama_family)


def test_enospc_while_preallocating_then_resume(llama_family, recipe, tmp_path, monkeypatch, capsys):
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform")
    calls = []

    def full(fd, offset, length):
        calls.append(length)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "out"
    code, text = cli(capsys, recipe, out)
    assert calls, "the shard was not preallocated"
    assert code == 2, text
    assert "disk is full" in text and "--resume" in text and "Traceback" not in text
    assert not out.exists()

    monkeypatch.setattr(os, "posix_fallocate", real)  # space freed
    code, text = cli(capsys, recipe, out, "--resume")
    assert code == 0, text
    assert not (tmp_path / "out.partial").exists()
    assert_merged(out, llama_family)


def test_enospc_while_preallocating_leaves_no_open_file(recipe, tmp_path, monkeypatch, capsys):
    """The shard whose preallocation failed is closed (a long-lived process using the API would
    otherwise keep a descriptor per failed attempt, and the space of the deleted file with it)."""
    if not hasattr(os, "posix_fallocate") or not Path("/proc/self/fd").is_dir():
        pytest.skip("needs posix_fallocate and /proc")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    code, text = cli(capsys, recipe, tmp_path / "out")
    assert code == 2, text
    leaked = open_files_under(tmp_path / "out.partial")
    assert leaked == [], f"the failed shard's file descriptor was left open: {leaked}"


def test_enospc_while_writing_then_resume(llama_family, recipe, tmp_path, monkeypatch, capsys):
    # Journal every finished tensor (not about every second), so that some are done before the failure.
    monkeypatch.setattr(api, "ExecContext", functools.partial(ExecContext, journal_every_s=0.0))
    real = ShardFile.write
    lock = threading.Lock()
    writes = [0]

    def write(self, name, start, data):
        with lock:
            writes[0] += 1
            n = writes[0]
        if n > 10:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, name, start, data)

    monkeypatch.setattr(ShardFile, "write", write)
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    code, text = cli(capsys, recipe, out)
    assert writes[0] > 10, "the failing write was never reached"
    assert code == 2, text
    assert "disk is full" in text and "--resume" in text and "Traceback" not in text
    assert not out.exists() and partial.is_dir()
    journaled = (partial / JOURNAL).read_text().count('"done"')
    assert journaled > 0

    monkeypatch.setattr(ShardFile, "write", real)  # space freed
    code, text = cli(capsys, recipe, out, "--resume")
    assert code == 0, text
    assert f"+{journaled} resumed" in text
    assert not partial.exists()
    assert_merged(out, llama_family)
