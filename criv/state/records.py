"""Versioned JSON records written atomically (write, fsync, rename, fsync dir).

A record file is ``{"version": N, "kind": "...", "data": {...}}``. Readers refuse a
version newer than they know, so a downgrade never misreads state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# write_atomic lives in criv.atomicfile (one copy for all of criv); re-exported here
from criv.atomicfile import write_atomic
from criv.errors import Internal

__all__ = ["read_record", "write_atomic", "write_record"]


def write_record(path: Path, kind: str, version: int, data: dict[str, Any]) -> None:
    doc = {"version": version, "kind": kind, "data": data}
    write_atomic(path, json.dumps(doc, sort_keys=True, indent=1).encode())


def read_record(path: Path, kind: str, max_version: int) -> tuple[int, dict[str, Any]]:
    """Return (version, data); raise Internal if the file is not a record we can read."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise Internal(f"cannot read record {path}: {e}") from e
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        raise Internal(f"{path} is not a {kind} record")
    version = doc.get("version")
    if not isinstance(version, int) or version > max_version:
        raise Internal(f"{path}: {kind} record version {version!r} is newer than {max_version}")
    data = doc.get("data")
    if not isinstance(data, dict):
        raise Internal(f"{path}: {kind} record has no data")
    return version, data
