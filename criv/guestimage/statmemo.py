"""Remember a value computed from files until one of those files changes.

Finding the guest image for a pod needs its content hash, which reads and hashes the agent
and builder trees and asks dpkg for the kernel source version: ~10-20 ms of every pod
start, for inputs that change only when criv is upgraded. A :class:`StatMemo` keeps the
last answer keyed by what ``stat`` says of the inputs (inode, size, mtime): a file
replaced, rewritten or removed gives a new key, so the value is computed afresh.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")
StatKey = tuple[tuple[str, int, int, int], ...]


def stat_key(paths: Iterable[Path]) -> StatKey:
    """What ``stat`` says of each path (a missing one: all -1)."""
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), -1, -1, -1))
    return tuple(out)


class StatMemo(Generic[T]):
    """The last few values of ``compute``, each under its key (the caller's own key plus
    :func:`stat_key` of the files the value depends on)."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._values: dict[tuple[Hashable, StatKey], T] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, files: Iterable[Path], compute: Callable[[], T]) -> T:
        full = (key, stat_key(files))
        with self._lock:
            if full in self._values:
                return self._values[full]
        value = compute()  # outside the lock: it may take a while; a race computes twice
        with self._lock:
            if len(self._values) >= self._size:
                self._values.pop(next(iter(self._values)))
            self._values[full] = value
        return value
