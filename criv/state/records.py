"""Versioned JSON records written atomically (write, fsync, rename, fsync dir).

A record file is ``{"version": N, "kind": "...", "data": {...}}``. Readers refuse a
version newer than they know, so a downgrade never misreads state.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from criv.errors import Internal


def write_atomic(path: Path, payload: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


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
