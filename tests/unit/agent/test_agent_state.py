"""Container records: the state machine, versioned JSON, atomic persistence (atomicfile.py)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from criv_agent import atomicfile, state
from criv_agent.errors import FailedPrecondition, NotFound
from criv_agent.state import (
    RECORD_VERSION,
    TRANSITIONS,
    ContainerRecord,
    ContainerStore,
    State,
    check_transition,
)


def test_transition_table() -> None:
    check_transition(State.CREATED, State.RUNNING)
    check_transition(State.CREATED, State.EXITED)
    check_transition(State.RUNNING, State.EXITED)
    check_transition(State.UNKNOWN, State.EXITED)
    check_transition(State.EXITED, State.EXITED)  # no change is always fine
    for bad in [(State.EXITED, State.RUNNING), (State.RUNNING, State.CREATED),
                (State.EXITED, State.CREATED)]:  # fmt: skip
        with pytest.raises(FailedPrecondition):
            check_transition(*bad)
    assert set(TRANSITIONS) == set(State)


def test_record_json_roundtrip_and_version() -> None:
    rec = ContainerRecord(id="c", sandbox_id="s", state=State.RUNNING, pid=42,
                          resources={"cpu_shares": "2"})  # fmt: skip
    d = rec.to_json()
    assert d["version"] == RECORD_VERSION and d["state"] == "running"
    assert ContainerRecord.from_json(json.loads(json.dumps(d))) == rec
    with pytest.raises(ValueError):
        ContainerRecord.from_json({**d, "version": 99})
    # unknown keys from a newer agent are ignored
    assert ContainerRecord.from_json({**d, "future": 1}) == rec


async def test_store_persists_updates_and_reloads(tmp_path: Path) -> None:
    store = ContainerStore(str(tmp_path))
    await store.add(ContainerRecord(id="c1", sandbox_id="s"))

    def exit_(r: ContainerRecord) -> None:
        r.state = State.EXITED
        r.exit_code = 3

    await store.update("c1", exit_)
    with pytest.raises(FailedPrecondition):
        await store.update("c1", lambda r: setattr(r, "state", State.RUNNING))
    assert store.get("c1").state == State.EXITED  # failed update left it unchanged
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "record.json").write_text("{not json")
    again = ContainerStore(str(tmp_path))
    assert again.load() == ["broken"]
    assert again.get("c1").exit_code == 3
    assert not list(tmp_path.glob("c1/*.tmp*"))
    await again.remove("c1")
    with pytest.raises(NotFound):
        again.get("c1")
    await again.remove("c1")


async def test_store_writes_off_the_loop_one_change_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ContainerStore(str(tmp_path))
    await store.add(ContainerRecord(id="c1", sandbox_id="s"))
    seen: list[int] = []
    real = state.write_json_atomic

    def slow_write(path: str, data: dict[str, Any]) -> None:
        seen.append(store.get("c1").exit_code)  # not published before it is on disk
        time.sleep(0.02)
        real(path, data)

    monkeypatch.setattr(state, "write_json_atomic", slow_write)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    t = asyncio.create_task(ticker())

    async def bump() -> None:
        await store.update("c1", lambda r: setattr(r, "exit_code", r.exit_code + 1))

    await asyncio.gather(bump(), bump(), bump())
    t.cancel()
    assert seen == [0, 1, 2] and store.get("c1").exit_code == 3
    assert ticks > 3  # the loop ran while the records were written
    again = ContainerStore(str(tmp_path))
    assert again.load() == [] and again.get("c1").exit_code == 3


def test_write_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    synced: list[str] = []
    monkeypatch.setattr(atomicfile, "fsync_dir", synced.append)
    atomicfile.write_atomic(str(path), b"one", 0o644)
    atomicfile.write_json_atomic(str(tmp_path / "g.json"), {"b": 1, "a": 2})
    assert path.read_bytes() == b"one" and path.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "g.json").read_text() == '{"a": 2, "b": 1}'
    assert (tmp_path / "g.json").stat().st_mode & 0o777 == 0o600
    assert synced == [str(tmp_path)] * 2  # the rename is made durable too

    def no_rename(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "rename", no_rename)
    with pytest.raises(OSError):
        atomicfile.write_atomic(str(path), b"two")
    assert path.read_bytes() == b"one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "g.json"]  # no temp left
