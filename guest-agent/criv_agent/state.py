"""Container records and their state machine, persisted under the agent's state dir.

::

    CREATED --start--> RUNNING --exit--> EXITED --remove--> (gone)
       |                                   ^
       +--------------exit (killed)--------+
    any state --lost (agent restarted, process gone, no exit status)--> UNKNOWN
    UNKNOWN --exit--> EXITED

One JSON file per container (``containers/<id>/record.json``, versioned), written
atomically (atomicfile.py: write, fsync, rename, fsync the directory) on every state
change, so that a restarted agent still reports exit codes. Changes go through
``ContainerStore.update(id, fn)`` only; the disk work runs in a thread, and a change is
published in memory only once it is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from criv_agent.atomicfile import write_json_atomic
from criv_agent.errors import FailedPrecondition, NotFound

RECORD_VERSION = 1


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.CREATED: frozenset({State.RUNNING, State.EXITED, State.UNKNOWN}),
    State.RUNNING: frozenset({State.EXITED, State.UNKNOWN}),
    State.EXITED: frozenset(),
    State.UNKNOWN: frozenset({State.EXITED}),
}


def check_transition(old: State, new: State) -> None:
    if old != new and new not in TRANSITIONS[old]:
        raise FailedPrecondition(f"container cannot go from {old.value} to {new.value}")


@dataclass
class ContainerRecord:
    id: str
    sandbox_id: str
    state: State = State.CREATED
    created_at_ns: int = 0
    started_at_ns: int = 0
    finished_at_ns: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0
    tty: bool = False
    stop_signal: int = 15
    cgroups_path: str = ""
    bundle: str = ""
    log_path: str = ""
    # CRI LinuxContainerResources as JSON (proto field names), for ContainerStatus
    resources: dict[str, Any] = field(default_factory=dict)
    # the OCI process user (uid, gid, additionalGids), for ContainerStatus.user
    user: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        d["version"] = RECORD_VERSION
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ContainerRecord:
        version = d.get("version", 0)
        if version != RECORD_VERSION:
            raise ValueError(f"unsupported record version {version}")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["state"] = State(kw.get("state", "unknown"))
        return cls(**kw)


class ContainerStore:
    """In-memory records backed by one file each; the only writer of records."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._records: dict[str, ContainerRecord] = {}
        # One change at a time: while a record is written (in a thread) no other change may
        # start from the published copy or remove the file under it.
        self._writing = asyncio.Lock()
        os.makedirs(root, mode=0o700, exist_ok=True)

    def dir(self, cid: str) -> str:
        return os.path.join(self.root, cid)

    def _path(self, cid: str) -> str:
        return os.path.join(self.root, cid, "record.json")

    def load(self) -> list[str]:
        """Read every record; returns the ids of unreadable ones (left on disk)."""
        bad: list[str] = []
        for cid in sorted(os.listdir(self.root)):
            try:
                with open(self._path(cid), encoding="utf-8") as f:
                    self._records[cid] = ContainerRecord.from_json(json.load(f))
            except (OSError, ValueError, TypeError):
                bad.append(cid)
        return bad

    async def add(self, rec: ContainerRecord) -> None:
        async with self._writing:
            await asyncio.to_thread(self._create, rec.id, rec.to_json())
            self._records[rec.id] = rec

    def _create(self, cid: str, data: dict[str, Any]) -> None:
        os.makedirs(self.dir(cid), mode=0o700, exist_ok=True)
        write_json_atomic(self._path(cid), data)

    def get(self, cid: str) -> ContainerRecord:
        rec = self._records.get(cid)
        if rec is None:
            raise NotFound(f"container {cid} not found")
        return rec

    def find(self, cid: str) -> ContainerRecord | None:
        return self._records.get(cid)

    def all(self) -> list[ContainerRecord]:
        return list(self._records.values())

    async def update(self, cid: str, fn: Callable[[ContainerRecord], None]) -> ContainerRecord:
        """Apply ``fn`` to a copy, check the state transition, persist, then publish."""
        async with self._writing:
            old = self.get(cid)
            new = ContainerRecord.from_json(old.to_json())
            fn(new)
            check_transition(old.state, new.state)
            await asyncio.to_thread(write_json_atomic, self._path(cid), new.to_json())
            self._records[cid] = new
            return new

    async def remove(self, cid: str) -> None:
        async with self._writing:
            self._records.pop(cid, None)
            await asyncio.to_thread(self._unlink, cid)

    def _unlink(self, cid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(cid))
