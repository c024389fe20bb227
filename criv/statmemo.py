"""Values computed from files, kept until one of those files changes.

Status is asked often and its answer (is crun installed, is there a CNI config and are
its plugins there) changes rarely. Working it out walks PATH, lists and parses the CNI
config and looks for every plugin: ~80 us, where stat-ing the few files it came from
costs a few. containerd watches the CNI directory with inotify; comparing stats gives
the same answer with nothing running in the background.

A file's stamp is its device, inode, size, mtime and ctime. A stamp younger than
:data:`RACY_NS` is not trusted (as git's "racy" index entries): a file changed twice
within one tick of a coarse kernel clock keeps its mtime, and a change between the
computation and the stamping would otherwise be missed for good.

:class:`StatMemo` learns the files from the computation (Status). :class:`KeyedStatMemo`
is told them up front and keeps a few values by key (the guest image's content hash and
the kernel source version, asked at every pod start, ~10-20 ms to work out).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

Stamp = tuple[int, int, int, int, int]
RACY_NS = 2_000_000_000


def stamp(path: str) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class StatMemo(Generic[T]):
    """``compute()`` returns the value and the paths it was read from, or ``None`` for
    "do not keep it" (criv keeps a not-ready answer from nothing: it is worked out again
    each time). :meth:`get` computes again once any path's stamp differs."""

    def __init__(
        self,
        compute: Callable[[], tuple[T, Sequence[str] | None]],
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._compute = compute
        self._clock = clock
        self._kept: tuple[T, Sequence[str], list[Stamp | None]] | None = None

    def get(self) -> T:
        if self._kept is not None:
            kept, paths, stamps = self._kept
            if [stamp(p) for p in paths] == stamps:
                return kept
            self._kept = None
        value, read = self._compute()
        if read is not None:
            now = [stamp(p) for p in read]
            if not self._racy(now):
                self._kept = (value, read, now)
        return value

    def _racy(self, stamps: list[Stamp | None]) -> bool:
        newest = max((max(s[3], s[4]) for s in stamps if s is not None), default=0)
        return self._clock() - newest < RACY_NS


class KeyedStatMemo(Generic[T]):
    """The last few values of ``compute``, each under its key: the caller's own key plus
    the stamps of the files the value depends on (a missing file stamps as ``None``)."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._values: dict[tuple[Hashable, tuple[tuple[str, Stamp | None], ...]], T] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, files: Iterable[Path], compute: Callable[[], T]) -> T:
        full = (key, tuple((str(p), stamp(str(p))) for p in files))
        with self._lock:
            if full in self._values:
                return self._values[full]
        value = compute()  # outside the lock: it may take a while; a race computes twice
        with self._lock:
            if len(self._values) >= self._size:
                self._values.pop(next(iter(self._values)))
            self._values[full] = value
        return value
