"""Crash-safe file changes, the one copy for all of criv (blocking functions).

A file is replaced whole or not at all: written to a temp file beside it, fsynced,
renamed over it, and the directory fsynced so the rename itself survives a crash.
Temp files are named ``.<name>.<random>.tmp``, so a loader can sweep the ones an
interrupted write left. No criv imports: every layer (state, image, ...) may use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the entries of ``path`` (a rename, a create, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_durable(src: Path, dst: Path) -> None:
    """Rename ``src`` (already fsynced by the caller) to ``dst``, then fsync dst's dir."""
    os.rename(src, dst)
    fsync_dir(dst.parent)


def unlink_durable(path: Path) -> None:
    """Remove ``path`` if present and fsync its directory."""
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_atomic(path: Path, payload: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``payload``: write, fsync, chmod, rename, fsync the dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        rename_durable(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
