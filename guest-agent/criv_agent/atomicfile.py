"""Crash-safe file replacement for the agent (blocking; call it through a thread).

A file is replaced whole or not at all: written to a temp file beside it, fsynced,
renamed over it, and the directory fsynced so that the rename itself survives a crash.
Temp files are ``.<name>.<random>.tmp`` in the same directory, removed on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (a rename, a create) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``, whatever the umask)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def write_json_atomic(path: str, data: dict[str, Any], mode: int = 0o600) -> None:
    write_atomic(path, json.dumps(data, sort_keys=True).encode(), mode)
