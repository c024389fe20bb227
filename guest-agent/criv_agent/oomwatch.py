"""Noticing OOM kills inside running containers when they happen, without polling.

cgroup v2 marks a cgroup's ``memory.events`` modified (inotify IN_MODIFY) whenever one of
its counters moves, an OOM kill among them. The agent watches that file of each running
container and re-reads the counters when it changes. It used to read every running
container's counters once a second: under TCG each of those wake-ups is emulated guest
work, in every idle pod. A running container whose file cannot be watched (cgroup v1, no
inotify, out of watches) has its counters polled each second, as before.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import struct
from collections.abc import Callable

log = logging.getLogger(__name__)

# memory.events also moves on every "max"/"high" event: a container pressing on its limit
# can change it up to 100 times a second (cgroup's notify interval); one check per
# container in this long is enough
SETTLE = 0.1
IN_MODIFY = 0x00000002
IN_IGNORED = 0x00008000  # the watch is gone (its cgroup was removed)
IN_Q_OVERFLOW = 0x00004000  # events were lost: check everything
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)


class OomWatch:
    """inotify watches on ``memory.events`` files; ``changed(cid)`` runs on the event loop
    for each container whose file changed (every watched one after a queue overflow),
    ``SETTLE`` s after the first change, once for all the changes in between."""

    def __init__(self, changed: Callable[[str], None]) -> None:
        self._changed = changed
        self._cids: dict[int, str] = {}  # watch descriptor -> container id
        self._wds: dict[str, int] = {}
        self._due: set[str] = set()  # containers with a check scheduled
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd: int = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop: asyncio.AbstractEventLoop | None = None
        if self._fd < 0:
            log.warning("no inotify (%s): OOM kills are polled", os.strerror(ctypes.get_errno()))

    @property
    def available(self) -> bool:
        return self._fd >= 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.available and self._loop is None:
            self._loop = loop
            loop.add_reader(self._fd, self._readable)

    def watch(self, cid: str, events_file: str) -> bool:
        """Watch ``events_file`` for ``cid``; False where it cannot be (the caller polls)."""
        if not self.available:
            return False
        if self._loop is None:
            self.start(asyncio.get_running_loop())
        wd: int = self._libc.inotify_add_watch(self._fd, os.fsencode(events_file), IN_MODIFY)
        if wd < 0:
            err = ctypes.get_errno()
            if err != errno.ENOENT:  # ENOSPC: out of watches; the agent falls back to polling
                log.warning("cannot watch %s: %s", events_file, os.strerror(err))
            return False
        self.unwatch(cid)
        self._cids[wd] = cid
        self._wds[cid] = wd
        return True

    def watching(self, cid: str) -> bool:
        return cid in self._wds

    def unwatch(self, cid: str) -> None:
        wd = self._wds.pop(cid, None)
        if wd is not None:
            self._cids.pop(wd, None)
            self._libc.inotify_rm_watch(self._fd, wd)  # EINVAL if already gone: fine

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        changed: list[str] = []
        for off in _offsets(data):
            wd, mask, _cookie, _n = _EVENT.unpack_from(data, off)
            if mask & IN_Q_OVERFLOW:
                changed.extend(self._wds)
            elif mask & IN_IGNORED:
                cid = self._cids.pop(wd, None)
                if cid is not None and self._wds.get(cid) == wd:
                    del self._wds[cid]
            elif wd in self._cids:
                changed.append(self._cids[wd])
        for cid in changed:
            if cid not in self._due and self._loop is not None:
                self._due.add(cid)
                self._loop.call_later(SETTLE, self._check, cid)

    def _check(self, cid: str) -> None:
        self._due.discard(cid)
        if cid in self._wds:  # not unwatched meanwhile (its exit is checked on its own)
            self._changed(cid)

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._cids.clear()
        self._wds.clear()


def _offsets(data: bytes) -> list[int]:
    out, off = [], 0
    while off + _EVENT.size <= len(data):
        out.append(off)
        off += _EVENT.size + _EVENT.unpack_from(data, off)[3]
    return out
