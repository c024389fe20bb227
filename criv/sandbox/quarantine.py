"""Records criv could not read at start-up, moved aside instead of acted on.

An unreadable record says nothing about what its object still holds: a pod's agent or
VM may run, its netns and mounts may be live, a container's overlay may be mounted over
image layers that its lease keeps. So recovery neither deletes nor releases anything of
it: the record file moves to ``<state_dir>/quarantine/<kind>-<id>.json`` beside a note
(``<kind>-<id>.note.json``: where it was, why, when), the object's directory stays where
it is, and ``criv doctor`` lists the note with what to do. While the note exists, every
later start keeps the object's directory, mounts, netns, processes and image lease; an
operator who has dealt with it (fixed and moved back the record, or cleaned up by hand)
deletes the note.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from criv.atomicfile import fsync_dir
from criv.errors import CrivError
from criv.state.records import read_record, write_record

log = logging.getLogger("criv.sandbox.quarantine")

DIR_NAME = "quarantine"
NOTE_KIND = "quarantine"
NOTE_VERSION = 1
_NOTE_SUFFIX = ".note.json"


@dataclass(frozen=True)
class Quarantined:
    kind: str  # "pod" | "container"
    id: str  # the pod's or container's id (its directory's name)
    pod_id: str  # the pod it belongs to (itself for a pod)
    original: str  # where the record was
    record: str  # where it is now ("" when there was no file to move)
    directory: str  # the object's directory, kept as it was
    reason: str
    at: str  # UTC, ISO 8601

    def what_to_do(self) -> str:
        if self.kind == "pod":
            return (
                f"its agent/VM, netns and mounts under {self.directory} are kept: repair the "
                f"record and move it back to {self.original}, or stop what runs and remove the "
                "directory (docs/operations.md, Quarantine); then delete the note"
            )
        return (
            f"its mounts and image lease are kept: repair the record and move it back to "
            f"{self.original}, or unmount what is under {self.directory} and remove it; "
            "then delete the note (the next start releases the lease)"
        )


def quarantine_dir(state_dir: Path) -> Path:
    return state_dir / DIR_NAME


def _note_path(state_dir: Path, kind: str, oid: str) -> Path:
    return quarantine_dir(state_dir) / f"{kind}-{oid}{_NOTE_SUFFIX}"


def is_quarantined(state_dir: Path, kind: str, oid: str) -> bool:
    return _note_path(state_dir, kind, oid).exists()


def quarantine(
    state_dir: Path, kind: str, oid: str, pod_id: str, record: Path, reason: str
) -> Quarantined:
    """Move ``record`` aside and write the note (blocking). The object's directory
    (``record``'s parent) is left as it is."""
    qdir = quarantine_dir(state_dir)
    qdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest = qdir / f"{kind}-{oid}.json"
    moved = ""
    if record.exists():
        if dest.exists():  # an older copy: keep both, the newest under the plain name
            dest.rename(qdir / f"{kind}-{oid}.{time.time_ns()}.json")
        shutil.move(record, dest)
        fsync_dir(record.parent)
        moved = str(dest)
    q = Quarantined(
        kind=kind,
        id=oid,
        pod_id=pod_id,
        original=str(record),
        record=moved,
        directory=str(record.parent),
        reason=reason,
        at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    write_record(_note_path(state_dir, kind, oid), NOTE_KIND, NOTE_VERSION, asdict(q))
    log.error("quarantined %s %s: %s; %s", kind, oid[:12], reason, q.what_to_do())
    return q


def list_quarantined(state_dir: Path) -> list[Quarantined]:
    """Every note, oldest name first; an unreadable note is shown by its file name."""
    qdir = quarantine_dir(state_dir)
    out: list[Quarantined] = []
    if not qdir.is_dir():
        return out
    for p in sorted(qdir.glob(f"*{_NOTE_SUFFIX}")):
        try:
            _, data = read_record(p, NOTE_KIND, NOTE_VERSION)
            out.append(
                Quarantined(**{k: str(data.get(k, "")) for k in Quarantined.__annotations__})
            )
        except (CrivError, TypeError) as e:
            kind, _, oid = p.name.removesuffix(_NOTE_SUFFIX).partition("-")
            out.append(Quarantined(kind, oid, oid, "", "", "", f"unreadable note {p}: {e}", ""))
    return out


def forget(state_dir: Path, kind: str, oid: str) -> None:
    """Drop the note (the object was dealt with)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_note_path(state_dir, kind, oid))
