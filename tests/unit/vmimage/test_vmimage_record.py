"""The vm-image agent record (criv/sandbox/vmimage/record.py): what a restarted criv takes
a vm-image pod back by. Round trip, the version, and every way a file can be corrupt or
hostile (a field naming a host path, a guest-sized message, a link, a FIFO, a huge file):
refused as RecordInvalid, never anything else."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from criv.errors import FailedPrecondition
from criv.sandbox.vmimage import record
from criv.sandbox.vmimage.boxstate import BOX_TRANSITIONS, BoxState, check_box
from criv.sandbox.vmimage.record import AgentRecord, BoxRecord, ConsoleMark, RecordInvalid
from criv.vmimage.sshkeys import HostKeyPin

pytestmark = pytest.mark.timeout(30)

POD = "a" * 64
CID = "0123456789abcdef" * 4
PIN = HostKeyPin("ssh-ed25519", "A" * 42 + "+")
UUID = "6f1c2b9e-0d4e-4f8a-9c3b-1e2d3c4b5a69"


def _box(**kw: Any) -> BoxRecord:
    base: dict[str, Any] = {
        "cid": CID, "state": BoxState.RUNNING, "base": "f" * 32 + ".qcow2",
        "disk_name": "criv-test.qcow2", "user": "root", "created_at_ns": 1_700_000_000 * 10**9,
        "started_at_ns": 1_700_000_001 * 10**9, "domain_uuid": UUID, "pin": PIN,
        "mark": ConsoleMark(4096, 5000),
    }  # fmt: skip
    base.update(kw)
    return BoxRecord(**base)


def _doc(rec: AgentRecord) -> dict[str, Any]:
    return {"version": record.VERSION, "kind": record.KIND, "data": record.encode(rec)}


def _raw(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def test_round_trip(tmp_path: Path) -> None:
    path = record.record_path(tmp_path / "pod")
    assert path == tmp_path / "pod" / "vmimage" / "agent.json"
    for rec in (
        AgentRecord(POD),
        AgentRecord(POD, _box()),
        AgentRecord(POD, _box(state=BoxState.STOPPING, pin=None, base="e" * 32 + ".raw")),
        AgentRecord(POD, _box(state=BoxState.CREATED, started_at_ns=0, domain_uuid="")),
        AgentRecord(
            POD,
            _box(
                state=BoxState.EXITED,
                finished_at_ns=3,
                exit_code=255,
                reason="VMGone",
                message="the VM stopped\ntail:\n\\x1b",
            ),
        ),
    ):
        record.write(path, rec)
        assert record.read(path, POD) == rec
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["agent.json"]  # no temp file left
    raw = AgentRecord(POD, _box(base="e" * 32 + ".raw"))
    record.write(path, raw)
    assert record.read(path, POD).container.base_format == "raw"  # type: ignore[union-attr]
    record.remove(path)
    record.remove(path)  # idempotent
    with pytest.raises(RecordInvalid, match="no record"):
        record.read(path, POD)


def test_a_long_message_is_cut_when_written_so_it_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    record.write(path, AgentRecord(POD, _box(message="x" * (record.MAX_MESSAGE + 500))))
    got = record.read(path, POD).container
    assert got is not None and len(got.message) == record.MAX_MESSAGE


def test_versions() -> None:
    doc = _doc(AgentRecord(POD, _box()))
    assert record.parse(_raw(doc), POD).container == _box()
    for version in (record.VERSION + 1, 0, -1, "1", True, None, 1.0):
        bad = {**doc, "version": version}
        with pytest.raises(RecordInvalid, match="version"):
            record.parse(_raw(bad), POD)
    with pytest.raises(RecordInvalid, match="not a vm-image-agent record"):
        record.parse(_raw({**doc, "kind": "sandbox"}), POD)


def test_firmware_and_version_1_records() -> None:
    uefi = _doc(AgentRecord(POD, _box(firmware="uefi")))
    assert record.parse(_raw(uefi), POD).container == _box(firmware="uefi")
    # version 1 (before UEFI) had no firmware: its containers boot with SeaBIOS
    old = copy.deepcopy(uefi)
    old["version"] = 1
    del old["data"]["container"]["firmware"]
    assert record.parse(_raw(old), POD).container == _box(firmware="bios")
    for bad in ("efi", "UEFI", "", 1, None):
        doc = copy.deepcopy(uefi)
        doc["data"]["container"]["firmware"] = bad
        with pytest.raises(RecordInvalid, match="firmware"):
            record.parse(_raw(doc), POD)


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b'{"version": 1, "kind": "vm-image-agent", "data"', b"[]", b"null", b"\xff\xfe",
     b"[" * 100_000, b'{"version": 1, "kind": "vm-image-agent"}',
     b'{"version": 1, "kind": "vm-image-agent", "data": []}'],
)  # fmt: skip
def test_corrupt_files_are_refused(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "agent.json"
    path.write_bytes(raw)
    with pytest.raises(RecordInvalid):
        record.read(path, POD)


HOSTILE: list[tuple[str, Any]] = [
    ("cid", "../../../etc"),
    ("cid", "c1"),
    ("cid", CID.upper()),
    ("state", "paused"),
    ("state", 1),
    ("base", "../../../../etc/shadow"),
    ("base", "/etc/shadow"),
    ("base", "f" * 32 + ".vmdk"),
    ("base", "f" * 31 + "/.qcow2"),
    ("disk_name", "../x.qcow2"),
    ("disk_name", ".."),
    ("disk_name", "a\0b"),
    ("disk_name", "x" * 256),
    ("user", "root\n"),
    ("user", "../root"),
    ("user", "Root"),
    ("created_at_ns", -1),
    ("created_at_ns", True),
    ("created_at_ns", 1.5),
    ("created_at_ns", "1"),
    ("created_at_ns", 1 << 63),
    ("exit_code", 256),
    ("exit_code", -9),
    ("reason", "Killed; rm -rf /"),
    ("reason", "x" * 65),
    ("message", "x" * (record.MAX_MESSAGE + 1)),
    ("message", 7),
    ("domain_uuid", "not-a-uuid"),
    ("domain_uuid", UUID.upper()),
    ("pin", {"type": "ssh-dss", "sha256": "A" * 43}),
    ("pin", {"type": "ssh-ed25519", "sha256": "A" * 42}),
    ("pin", {"type": "ssh-ed25519", "sha256": "A" * 42 + "/../"}),
    ("pin", "ssh-ed25519 SHA256:" + "A" * 43),
    ("console", {"offset": -1, "log_size": 0}),
    ("console", {"offset": 0}),
    ("console", {"offset": 1 << 51, "log_size": 0}),
    ("console", None),
]


@pytest.mark.parametrize(("key", "value"), HOSTILE)
def test_hostile_fields_are_refused(key: str, value: Any) -> None:
    doc = _doc(AgentRecord(POD, _box()))
    bad = copy.deepcopy(doc)
    bad["data"]["container"][key] = value
    with pytest.raises(RecordInvalid):
        record.parse(_raw(bad), POD)
    del bad["data"]["container"][key]
    if key == "pin":  # no pin is a pin not known yet
        assert record.parse(_raw(bad), POD).container == _box(pin=None)
        return
    with pytest.raises(RecordInvalid):
        record.parse(_raw(bad), POD)


def test_the_record_must_be_this_pods_and_consistent() -> None:
    raw = _raw(_doc(AgentRecord(POD, _box())))
    with pytest.raises(RecordInvalid, match="not this pod's"):
        record.parse(raw, "b" * 64)
    for state in (BoxState.RUNNING, BoxState.STOPPING):
        for kw in ({"domain_uuid": ""}, {"started_at_ns": 0}):
            with pytest.raises(RecordInvalid, match="no start time or domain"):
                record.parse(_raw(_doc(AgentRecord(POD, _box(state=state, **kw)))), POD)
    doc = _doc(AgentRecord(POD))
    doc["data"]["container"] = "none"
    with pytest.raises(RecordInvalid, match="container is not an object"):
        record.parse(_raw(doc), POD)
    # keys a later version of the same record may add are ignored
    doc = _doc(AgentRecord(POD, _box()))
    doc["data"]["later"] = 1
    doc["data"]["container"]["later"] = {"x": 1}
    assert record.parse(_raw(doc), POD).container == _box()


def test_links_fifos_and_huge_files_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    record.write(good, AgentRecord(POD, _box()))
    link = tmp_path / "agent.json"
    link.symlink_to(good)
    with pytest.raises(RecordInvalid, match="symlink"):
        record.read(link, POD)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(RecordInvalid, match="not a regular file"):
        record.read(fifo, POD)  # no writer: must not hang
    with pytest.raises(RecordInvalid, match="not a regular file"):
        record.read(tmp_path, POD)
    big = tmp_path / "big.json"
    doc = _doc(AgentRecord(POD, _box()))
    doc["pad"] = "x" * record.MAX_RECORD_BYTES
    big.write_bytes(_raw(doc))
    with pytest.raises(RecordInvalid, match="larger than"):
        record.read(big, POD)


def test_the_state_machine() -> None:
    assert set(BOX_TRANSITIONS) == set(BoxState)
    check_box(BoxState.CREATED, BoxState.RUNNING)
    check_box(BoxState.STOPPING, BoxState.RUNNING)  # a stop that a restart cut short
    check_box(BoxState.EXITED, BoxState.EXITED)
    for old, new in [
        (BoxState.EXITED, BoxState.RUNNING),
        (BoxState.RUNNING, BoxState.CREATED),
        (BoxState.CREATED, BoxState.STOPPING),
    ]:
        with pytest.raises(FailedPrecondition, match="cannot go from"):
            check_box(old, new)
