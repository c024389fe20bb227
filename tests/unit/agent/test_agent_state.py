"""Container records: the state machine, versioned JSON, atomic persistence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_store_persists_updates_and_reloads(tmp_path: Path) -> None:
    store = ContainerStore(str(tmp_path))
    store.add(ContainerRecord(id="c1", sandbox_id="s"))

    def exit_(r: ContainerRecord) -> None:
        r.state = State.EXITED
        r.exit_code = 3

    store.update("c1", exit_)
    with pytest.raises(FailedPrecondition):
        store.update("c1", lambda r: setattr(r, "state", State.RUNNING))
    assert store.get("c1").state == State.EXITED  # failed update left it unchanged
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "record.json").write_text("{not json")
    again = ContainerStore(str(tmp_path))
    assert again.load() == ["broken"]
    assert again.get("c1").exit_code == 3
    assert not list(tmp_path.glob("c1/*.tmp*"))
    again.remove("c1")
    with pytest.raises(NotFound):
        again.get("c1")
    again.remove("c1")
