"""The output folder's life cycle: checks, the ``.partial`` sibling, the resume journal, the rename.

A merge writes into ``OUT.partial/`` and renames it to ``OUT`` only when everything (weights,
config, tokenizer, card) is in place, so a folder named ``OUT`` is always complete. The journal
in the partial folder lists tensors whose bytes are written; ``--resume`` skips them, after
checking that the plan (recipe, inputs, layout) is the one the journal was written for. A tensor
that read or wrote NaN/±inf carries its counts in its ``done`` entry, so that a resumed merge
reports (and ``--strict`` refuses) them as an uninterrupted one would.

Journal entries are appended often (about every second) without fsync: after a killed process
the page cache still holds both the data and the journal, in order. Only every ``sync`` (shards
fsynced first, then a ``synced`` marker) are they safe from a power loss too. The journal records
the kernel's boot id, so a resume after a reboot trusts only entries up to the last marker.

The journal also records the identity of every input weight file at the start of each attempt, and
input digests as the hasher finds them; before the rename, the inputs must be proven unchanged over
the partial output's whole life (``io.identity``), or the merge is not finalised. ``OUT.lock`` keeps
a second merge out of ``OUT`` meanwhile (``io.lock``).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekitlite.budget import human
from mergekitlite.errors import InputChangedError, OutputError, explain_os_error, naming
from mergekitlite.io.identity import file_identity, lost_for_good, unproven
from mergekitlite.io.lock import PathLock
from mergekitlite.nonfinite import NonFinite
from mergekitlite.taskgraph import Plan

JOURNAL = "mergekitlite-journal.jsonl"
DISK_MARGIN = 64 * 1024 * 1024


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def lock_output(out: Path) -> PathLock:
    """The lock a merge into ``out`` holds from before its checks until after the rename (``with``)."""
    out = out.resolve()
    _make_parent(out)
    return PathLock(out.with_name(out.name + ".lock"), out)


def output_os_error(exc: OSError, where: Path) -> Exception:
    """An OutputError for an OSError met writing ``where`` (a full disk, a read-only or unwritable
    folder...), or ``exc`` itself when it is not something a user causes (a bug)."""
    text = explain_os_error(exc, where, writing=True)
    return OutputError(text) if text else exc


def _make_parent(out: Path) -> None:
    parent = out.parent
    try:
        existing = next(p for p in (parent, *parent.parents) if os.path.lexists(p))
        if not existing.is_dir():
            raise OutputError(
                f"{existing} is a file, not a folder, so the output {out} cannot be created under it; "
                "choose another output path"
            )
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_os_error(exc, parent) from None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def input_files(plan: Plan) -> list[Path]:
    """Every file a merge reads weights from."""
    return sorted({f for src in plan.sources.values() for f in src.input_files()})


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
class JournalState:
    """What a partial output's journal says."""

    fingerprint: str | None = None
    done: set[str] = field(default_factory=set)  # tensors safely written
    seen: dict[str, list[str]] = field(default_factory=dict)  # input file → identities observed, in order
    hashes: dict[str, dict[str, str]] = field(default_factory=dict)  # input file → identity → sha256
    nonfinite: dict[str, NonFinite] = field(default_factory=dict)  # done tensor → the NaN/±inf it met


@dataclass
class PartialOutput:
    final: Path
    path: Path
    fingerprint: str
    done: set[str] = field(default_factory=set)
    resumed: bool = False
    journal: JournalState = field(default_factory=JournalState)
    nonfinite: dict[str, NonFinite] = field(default_factory=dict)  # tensor → NaN/±inf, this attempt's and resumed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _append(
        self, entries: Iterable[Mapping[str, Any]], *, sync: bool = False, after_torn_line: bool = False
    ) -> None:
        """Append journal lines (from the executor's and the hasher's threads alike).
        ``after_torn_line``: start on a new line, the last one may have been cut short."""
        text = "".join(json.dumps(e) + "\n" for e in entries)
        if after_torn_line and not _ends_a_line(self.path / JOURNAL):
            text = "\n" + text
        with self._lock, naming(self.path / JOURNAL), open(self.path / JOURNAL, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if sync:
                os.fsync(f.fileno())

    def record(self, names: Iterable[str], synced: bool) -> None:
        """Append finished tensors; ``synced``: their data (and all earlier data) is fsynced."""
        names = list(names)
        entries = [
            {"done": n} | ({"nonfinite": self.nonfinite[n].to_json()} if n in self.nonfinite else {}) for n in names
        ]
        self._append([*entries, *([{"synced": True}] if synced else [])], sync=synced)
        self.done.update(names)

    def record_nonfinite(self, name: str, found: NonFinite) -> None:
        """The NaN/±inf a tensor met; journalled with its ``done`` entry (called before it)."""
        self.nonfinite[name] = found

    def observe_inputs(self, files: Iterable[Path]) -> None:
        """Record the identity of every input file as this attempt starts."""
        now = {str(f): file_identity(f) for f in files}
        self._append([{"inputs": now}])
        for f, ident in now.items():
            self.journal.seen.setdefault(f, []).append(ident)

    def record_hashes(self, digests: Mapping[str, tuple[str, str]]) -> None:
        """Record ``file → (identity while hashed, sha256)``, as soon as they are known."""
        if not digests:
            return
        self._append([{"hashes": {f: list(v) for f, v in digests.items()}}])
        for f, (ident, sha) in digests.items():
            self.journal.hashes.setdefault(f, {})[ident] = sha

    def needing_hashes(self) -> list[Path]:
        """Input files whose identity changed since the partial output was started: they must be
        hashed to prove their contents unchanged. Raises InputChangedError when that can no longer be
        proven (an earlier identity was never hashed)."""
        need = []
        for f, seen in self.journal.seen.items():
            if len(set(seen)) < 2:
                continue
            reason = lost_for_good(seen[:-1], self.journal.hashes.get(f, {}), seen[-1])
            if reason:
                raise self._changed(f, reason)
            need.append(Path(f))
        return need

    def verify_inputs(self, files: Iterable[Path]) -> None:
        """Before finalising: every input file must be proven unchanged since the partial output was
        started (same identity throughout, or equal digests for every identity it had)."""
        for f in files:
            seen = [*self.journal.seen.get(str(f), []), file_identity(f)]
            reason = unproven(seen, self.journal.hashes.get(str(f), {}))
            if reason:
                raise self._changed(str(f), reason)

    def _changed(self, file: str, reason: str) -> InputChangedError:
        since = "since the partial output was started" if self.resumed else "while the merge ran"
        return InputChangedError(
            f"{file} changed {since}: {reason}. The merge could mix its old and new contents, so it is not "
            f"finalised: delete {self.path} and merge again without --resume"
        )

    def explain(self, exc: OSError) -> Exception:
        """The one-line error for an OSError met while merging into this partial output (writing it,
        or reading an input), or ``exc`` itself when it is not something a user causes (a bug)."""
        names = [Path(f) for f in (exc.filename, exc.filename2) if f]
        # shutil.copyfile names the source first even when writing the copy failed.
        where = next((f for f in names if _inside(f, self.path)), names[0] if names else self.path)
        writing = _inside(where, self.path) or where == self.final
        text = explain_os_error(OSError(exc.errno, exc.strerror, str(where)), writing=writing)
        if text is None:
            return exc
        return OutputError(f"{text}; then run again with --resume to continue (the merge so far is in {self.path})")

    def remove_strays(self, keep: Iterable[str]) -> None:
        """Remove every file but the journal and ``keep`` (the shards): side files an earlier attempt
        wrote, perhaps only in part or with other options, are all written again."""
        keep = {JOURNAL, *keep}
        for p in self.path.iterdir():
            if p.name not in keep and not p.is_dir():
                p.unlink()

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
            try:
                shutil.rmtree(old)
            except OSError as exc:
                raise OutputError(
                    f"the merge is complete in {self.final}, but the folder it replaced, moved to {old}, could not "
                    f"be removed ({exc.strerror}): remove it yourself"
                ) from None
        return self.final


def _ends_a_line(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


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


def _read_journal(path: Path) -> JournalState:
    """The journal's state. Entries not followed by a ``synced`` marker count only when they were
    written since the last boot: a power loss may have dropped their data."""
    state = JournalState()
    pending: set[str] = set()
    counts: dict[str, NonFinite | None] = {}  # the latest ``done`` entry's, per tensor
    segment_boot = None
    now = boot_id()
    try:
        lines = (path / JOURNAL).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return state
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill or a full disk; a resume starts on a new line after it
        if not isinstance(entry, dict):
            continue
        if "boot_id" in entry:
            if segment_boot == now:
                state.done |= pending
            pending = set()
            segment_boot = entry["boot_id"]
        if "fingerprint" in entry:
            state.fingerprint = entry["fingerprint"]
        if "done" in entry:
            pending.add(entry["done"])
            counts[entry["done"]] = _counts_of(entry.get("nonfinite"))
        elif entry.get("synced"):
            state.done |= pending
            pending = set()
        try:
            for f, ident in (entry.get("inputs") or {}).items():
                state.seen.setdefault(f, []).append(str(ident))
            for f, (ident, sha) in (entry.get("hashes") or {}).items():
                state.hashes.setdefault(f, {})[str(ident)] = str(sha)
        except (AttributeError, TypeError, ValueError):
            break  # not a line we wrote: trust nothing from here on
    if segment_boot == now:
        state.done |= pending
    state.nonfinite = {n: c for n, c in counts.items() if c is not None and n in state.done}
    return state


def _counts_of(entry: Any) -> NonFinite | None:
    """A ``done`` entry's NaN/±inf counts; a damaged record still says the tensor had some."""
    if entry is None:
        return None
    try:
        return NonFinite.from_json(entry)
    except (AttributeError, TypeError, ValueError):
        return NonFinite(outputs=1)


def open_partial(out: Path, plan: Plan, *, resume: bool, overwrite: bool) -> PartialOutput:
    """Create (or, with ``resume``, reopen) ``OUT.partial`` after all checks pass. The caller holds
    :func:`lock_output`."""
    out = out.resolve()
    check_output_location(out, plan, overwrite=overwrite)
    _make_parent(out)
    partial = partial_path(out)
    fingerprint = plan.fingerprint()
    if os.path.lexists(partial):
        try:
            opened = _reopen(out, partial, fingerprint, resume=resume)
        except OSError as exc:
            raise output_os_error(exc, partial) from None
    else:
        opened = _create(out, partial, plan, fingerprint)
    try:
        if opened.resumed:
            opened._append([{"boot_id": boot_id()}], after_torn_line=True)
            opened.remove_strays(s.filename for s in plan.shards)
        opened.observe_inputs(input_files(plan))
    except OSError as exc:
        raise opened.explain(exc) from None
    return opened


def _create(out: Path, partial: Path, plan: Plan, fingerprint: str) -> PartialOutput:
    """A new partial output with its journal, or nothing at all: a folder without a journal would be
    taken for someone else's by the next run."""
    _check_free_space(out, plan)
    try:
        partial.mkdir()
        created = PartialOutput(out, partial, fingerprint)
        created._append([{"fingerprint": fingerprint, "boot_id": boot_id()}], sync=True)
        return created
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise output_os_error(exc, partial) from None


def _reopen(out: Path, partial: Path, fingerprint: str, *, resume: bool) -> PartialOutput:
    if not partial.is_dir():
        raise OutputError(
            f"{partial} is in the way: it is not a folder, so not an interrupted merge (that would be a folder); "
            "move or delete it"
        )
    if not resume:
        raise OutputError(
            f"an interrupted merge is in {partial}: add --resume to continue it, or delete that folder to start over"
        )
    state = _read_journal(partial)
    if state.fingerprint is None:
        raise OutputError(
            f"{partial} has no merge journal ({JOURNAL}), so it cannot be resumed (not a partial output of "
            "mergekitlite, or its journal was deleted); delete it to start over"
        )
    if state.fingerprint != fingerprint:
        raise OutputError(
            f"{partial} holds a merge of a different recipe or different inputs, so it cannot be "
            "resumed; delete it to start over"
        )
    return PartialOutput(
        out, partial, fingerprint, set(state.done), resumed=True, journal=state, nonfinite=dict(state.nonfinite)
    )


def _check_free_space(out: Path, plan: Plan) -> None:
    parent = out.parent
    need = plan.bytes_written + DISK_MARGIN
    free = shutil.disk_usage(parent).free
    if free < need:
        raise OutputError(
            f"not enough disk space in {parent}: the merge writes {human(plan.bytes_written)} of weights and needs "
            f"{human(DISK_MARGIN)} more for its other files, but {human(free)} are free; free some space or "
            "choose another output folder"
        )
