from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import criv.image.content
import criv.state.records
from criv import atomicfile
from criv.errors import Internal
from criv.state.records import read_record, write_record


def test_roundtrip_and_no_temp_files_left(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "rec.json"
    write_record(p, "thing", 1, {"a": 1})
    write_record(p, "thing", 1, {"a": 2})
    assert read_record(p, "thing", 1) == (1, {"a": 2})
    assert [f.name for f in p.parent.iterdir()] == ["rec.json"]


def test_newer_version_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "rec.json"
    write_record(p, "thing", 3, {})
    with pytest.raises(Internal, match="newer"):
        read_record(p, "thing", 2)


def test_wrong_kind_and_garbage_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "rec.json"
    write_record(p, "other", 1, {})
    with pytest.raises(Internal):
        read_record(p, "thing", 1)
    p.write_text("{not json")
    with pytest.raises(Internal):
        read_record(p, "thing", 1)
    p.write_text(json.dumps({"kind": "thing", "version": 1, "data": []}))
    with pytest.raises(Internal):
        read_record(p, "thing", 1)


def test_one_atomic_writer_for_all_of_criv() -> None:
    # the state records and the image store share criv.atomicfile's copy
    assert criv.state.records.write_atomic is atomicfile.write_atomic
    assert not hasattr(criv.image.content, "atomic_write")
    assert not hasattr(criv.image.content, "fsync_dir")


def test_write_atomic_syncs_the_file_and_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    p = tmp_path / "new" / "f"
    atomicfile.write_atomic(p, b"x", mode=0o640)
    assert synced == ["file", "dir"]
    assert p.read_bytes() == b"x" and stat.S_IMODE(p.stat().st_mode) == 0o640


def test_failed_write_keeps_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = tmp_path / "f"
    atomicfile.write_atomic(p, b"old")

    def rename(*_: object) -> None:
        raise OSError("injected")

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        atomicfile.write_atomic(p, b"new")
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["f"]
