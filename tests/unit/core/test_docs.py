"""docs/configuration.md documents every key criv accepts, with its default."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from criv.config import Config

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def _keys(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(_keys(value, key + "."))
        else:
            out[key] = value
    return out


def _doc_rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and cells[1].startswith("`"):
            rows[cells[1].strip("`")] = cells[2]
    return rows


def test_every_key_is_documented_with_its_default() -> None:
    rows = _doc_rows()
    for key, default in _keys(Config()).items():
        assert key in rows, f"{key} is not documented in {DOC.name}"
        shown = rows[key].strip("`")
        expected = default if isinstance(default, str) else json.dumps(default)
        if isinstance(default, str) and default == "":
            expected = '""'
        assert shown == expected, f"{key}: documented default {shown!r}, real {expected!r}"


def test_no_documented_key_is_unknown() -> None:
    known = set(_keys(Config()))
    extra = {k for k in _doc_rows() if "." in k or k in known} - known
    assert not extra, f"documented but not accepted: {extra}"
