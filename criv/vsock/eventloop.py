"""A tiny single-threaded epoll loop (the backend avoids asyncio: fewer allocations per
packet, smaller RSS).  Callbacks are registered per file descriptor for read and/or write.

It talks to ``select.epoll`` directly rather than through ``selectors``: the wrapper's key
objects and ready list cost a few microseconds per wake-up, and the round trip of a small
message wakes this loop twice."""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import time
from collections.abc import Callable

Callback = Callable[[], None]
log = logging.getLogger("criv.vsock")

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
# as selectors maps them: anything but EPOLLOUT wakes the reader (EPOLLHUP, EPOLLERR too),
# anything but EPOLLIN the writer
_IN_EVENTS = ~select.EPOLLOUT
_OUT_EVENTS = ~select.EPOLLIN


class Loop:
    def __init__(self) -> None:
        self.ep = select.epoll()
        self._cbs: dict[int, tuple[Callback | None, Callback | None]] = {}
        self._timers: list[tuple[float, int, Callback]] = []
        self._cancelled: set[int] = set()
        self._seq = itertools.count()
        self.idle_hooks: list[Callback] = []
        self.stopped = False

    def set(self, fd: int, on_read: Callback | None, on_write: Callback | None = None) -> None:
        """Set (or with both None, drop) interest in ``fd``."""
        old = self._cbs.get(fd)
        if on_read is None and on_write is None:
            if old is not None:
                del self._cbs[fd]
                self.ep.unregister(fd)
            return
        mask = (_IN if on_read else 0) | (_OUT if on_write else 0)
        self._cbs[fd] = (on_read, on_write)
        if old is None:
            self.ep.register(fd, mask)
        elif (_IN if old[0] else 0) | (_OUT if old[1] else 0) != mask:
            self.ep.modify(fd, mask)

    def drop(self, fd: int) -> None:
        self.set(fd, None, None)

    def call_later(self, delay: float, cb: Callback) -> int:
        handle = next(self._seq)
        heapq.heappush(self._timers, (time.monotonic() + delay, handle, cb))
        return handle

    def cancel(self, handle: int) -> None:
        self._cancelled.add(handle)

    def run_once(self, max_wait: float | None = None) -> None:
        timeout = -1.0 if max_wait is None else max_wait
        timers = self._timers
        if timers:
            t = max(0.0, timers[0][0] - time.monotonic())
            timeout = t if timeout < 0 else min(t, timeout)
        cbs = self._cbs
        call = self._call
        for fd, events in self.ep.poll(timeout):
            if events & _IN_EVENTS:
                pair = cbs.get(fd)
                if pair is not None and pair[0] is not None:
                    call(pair[0])
            if events & _OUT_EVENTS:
                pair = cbs.get(fd)
                if pair is not None and pair[1] is not None:
                    call(pair[1])
        if timers:
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                _, handle, cb = heapq.heappop(timers)
                if handle in self._cancelled:
                    self._cancelled.discard(handle)
                else:
                    call(cb)
        for hook in self.idle_hooks:
            call(hook)

    @staticmethod
    def _call(cb: Callback) -> None:
        """A bug in one handler must not take the VM's whole vsock device down with it."""
        try:
            cb()
        except Exception:
            log.exception("unhandled error in event handler")

    def run(self) -> None:
        while not self.stopped:
            self.run_once()

    def close(self) -> None:
        self.ep.close()
