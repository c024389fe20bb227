"""A tiny single-threaded selector loop (the backend avoids asyncio: fewer allocations per
packet, smaller RSS).  Callbacks are registered per file descriptor for read and/or write."""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import time
from collections.abc import Callable

Callback = Callable[[], None]
log = logging.getLogger("criv.vsock")


class Loop:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
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
                self.sel.unregister(fd)
            return
        mask = (selectors.EVENT_READ if on_read else 0) | (selectors.EVENT_WRITE if on_write else 0)
        self._cbs[fd] = (on_read, on_write)
        if old is None:
            self.sel.register(fd, mask)
        else:
            old_mask = (selectors.EVENT_READ if old[0] else 0) | (
                selectors.EVENT_WRITE if old[1] else 0
            )
            if old_mask != mask:
                self.sel.modify(fd, mask)

    def drop(self, fd: int) -> None:
        self.set(fd, None, None)

    def call_later(self, delay: float, cb: Callback) -> int:
        handle = next(self._seq)
        heapq.heappush(self._timers, (time.monotonic() + delay, handle, cb))
        return handle

    def cancel(self, handle: int) -> None:
        self._cancelled.add(handle)

    def run_once(self, max_wait: float | None = None) -> None:
        timeout = max_wait
        if self._timers:
            t = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = t if timeout is None else min(t, timeout)
        for key, events in self.sel.select(timeout):
            fd = key.fd
            if events & selectors.EVENT_READ:
                cbs = self._cbs.get(fd)
                if cbs is not None and cbs[0] is not None:
                    self._call(cbs[0])
            if events & selectors.EVENT_WRITE:
                cbs = self._cbs.get(fd)
                if cbs is not None and cbs[1] is not None:
                    self._call(cbs[1])
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, handle, cb = heapq.heappop(self._timers)
            if handle in self._cancelled:
                self._cancelled.discard(handle)
            else:
                self._call(cb)
        for hook in self.idle_hooks:
            self._call(hook)

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
        self.sel.close()
