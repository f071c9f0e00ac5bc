"""The output folder's life cycle: checks, the ``.partial`` sibling, the resume journal, the rename.

A merge writes into ``OUT.partial/`` and renames it to ``OUT`` only when everything (weights,
config, tokenizer, card) is in place, so a folder named ``OUT`` is always complete. The journal
in the partial folder lists tensors whose bytes are written; ``--resume`` skips them, after
checking that the plan (recipe, inputs, layout) is the one the journal was written for.

Journal entries are appended often (about every second) without fsync: after a killed process
the page cache still holds both the data and the journal, in order. Only every ``sync`` (shards
fsynced first, then a ``synced`` marker) are they safe from a power loss too. The journal records
the kernel's boot id, so a resume after a reboot trusts only entries up to the last marker.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mergekitlite.errors import OutputError
from mergekitlite.taskgraph import Plan

JOURNAL = "mergekitlite-journal.jsonl"
DISK_MARGIN = 64 * 1024 * 1024


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_location(out: Path, plan: Plan, *, overwrite: bool) -> None:
    """Refuse outputs that would overwrite or live inside an input model."""
    out = out.resolve()
    for src in plan.sources.values():
        folder = src.path.resolve()
        if _inside(out, folder):
            raise OutputError(
                f"output {out} is inside the folder of input model {src.ref!r} ({folder}); "
                "inputs are never modified: choose another output folder"
            )
        if _inside(folder, out):
            raise OutputError(f"output {out} contains input model {src.ref!r} ({folder}); choose another output folder")
    if out.exists() and not overwrite:
        raise OutputError(
            f"output {out} already exists; pass --overwrite to replace it (the old folder is removed only "
            "after the new merge is complete)"
        )
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")


@dataclass
class PartialOutput:
    final: Path
    path: Path
    fingerprint: str
    done: set[str] = field(default_factory=set)
    resumed: bool = False

    def record(self, names: Iterable[str], synced: bool) -> None:
        """Append finished tensors; ``synced``: their data (and all earlier data) is fsynced."""
        with open(self.path / JOURNAL, "a", encoding="utf-8") as f:
            for name in names:
                f.write(json.dumps({"done": name}) + "\n")
                self.done.add(name)
            if synced:
                f.write(json.dumps({"synced": True}) + "\n")
            f.flush()
            if synced:
                os.fsync(f.fileno())

    def commit(self, *, overwrite: bool) -> Path:
        """Remove the journal and move the finished folder into place."""
        (self.path / JOURNAL).unlink(missing_ok=True)
        _fsync_dir(self.path)
        old = None
        if self.final.exists():
            if not overwrite:
                raise OutputError(f"output {self.final} appeared while merging; the merge is left in {self.path}")
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.rename(self.final, old)
        os.rename(self.path, self.final)
        _fsync_dir(self.final.parent)
        if old is not None:
            shutil.rmtree(old)
        return self.final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _read_journal(path: Path) -> tuple[str | None, set[str]]:
    """(fingerprint, tensors safely written). Entries not followed by a ``synced`` marker count only
    when they were written since the last boot: a power loss may have dropped their data."""
    fingerprint = None
    done: set[str] = set()
    pending: set[str] = set()
    segment_boot = None
    now = boot_id()
    try:
        lines = (path / JOURNAL).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None, done
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break  # a torn last line from a kill: everything before it is valid
        if "boot_id" in entry:
            if segment_boot == now:
                done |= pending
            pending = set()
            segment_boot = entry["boot_id"]
        if "fingerprint" in entry:
            fingerprint = entry["fingerprint"]
        if "done" in entry:
            pending.add(entry["done"])
        elif entry.get("synced"):
            done |= pending
            pending = set()
    if segment_boot == now:
        done |= pending
    return fingerprint, done


def open_partial(out: Path, plan: Plan, *, resume: bool, overwrite: bool) -> PartialOutput:
    """Create (or, with ``resume``, reopen) ``OUT.partial`` after all checks pass."""
    out = out.resolve()
    check_output_location(out, plan, overwrite=overwrite)
    partial = partial_path(out)
    fingerprint = plan.fingerprint()
    if partial.exists():
        if not resume:
            raise OutputError(
                f"an interrupted merge is in {partial}: add --resume to continue it, or delete that folder "
                "to start over"
            )
        found, done = _read_journal(partial)
        if found != fingerprint:
            raise OutputError(
                f"{partial} holds a merge of a different recipe or different inputs, so it cannot be "
                "resumed; delete it to start over"
            )
        with open(partial / JOURNAL, "a", encoding="utf-8") as f:
            f.write(json.dumps({"boot_id": boot_id()}) + "\n")
        return PartialOutput(out, partial, fingerprint, done, resumed=True)

    need = plan.bytes_written + DISK_MARGIN
    parent = out.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    if free < need:
        raise OutputError(
            f"not enough disk space in {parent}: the merge writes {need / 1e9:.2f} GB, {free / 1e9:.2f} GB are free"
        )
    parent.mkdir(parents=True, exist_ok=True)
    partial.mkdir()
    with open(partial / JOURNAL, "w", encoding="utf-8") as f:
        f.write(json.dumps({"fingerprint": fingerprint, "boot_id": boot_id()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return PartialOutput(out, partial, fingerprint)
