from __future__ import annotations

import json
from pathlib import Path

import pytest

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
