"""Blocking calls on worker threads, each with a deadline that releases its caller.

A libvirt call is an RPC to libvirtd and cannot be interrupted: a hung libvirtd would
hold its thread, and whoever awaits it (under a pod's lock), for ever. Here the caller
gets :class:`~criv.errors.HypervisorTimeout` at the deadline and goes on; the thread is
left to finish (or hang) on its own. Threads are daemons, so a hung one never keeps criv
from exiting (a ``ThreadPoolExecutor`` joins its workers at exit), and at most
``threads`` run at once: while that many are stuck, further calls wait for a slot and
time out too instead of piling up threads. A call whose caller gave up before it got a
slot never runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from criv.errors import HypervisorTimeout

log = logging.getLogger("criv.hypervisor.calls")

T = TypeVar("T")


class DeadlineCalls:
    def __init__(self, threads: int, name: str) -> None:
        self._threads = threads
        self._name = name
        self._slots: asyncio.Semaphore | None = None  # made on the loop that uses it
        self.stuck = 0  # calls whose callers gave up while they ran

    async def run(self, fn: Callable[[], T], what: str, timeout: float) -> T:
        """``fn()`` on a worker thread; raises HypervisorTimeout after ``timeout`` s."""
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._threads)
        slots = self._slots
        fut: asyncio.Future[T] = loop.create_future()
        started = False
        try:
            async with asyncio.timeout(timeout) as cm:
                await slots.acquire()
                started = True
                threading.Thread(
                    target=self._work, args=(loop, fn, fut, slots), name=self._name, daemon=True
                ).start()
                return await asyncio.shield(fut)
        except TimeoutError:
            if not cm.expired():
                raise
            if started and not fut.done():
                self.stuck += 1
                fut.add_done_callback(self._unstuck)
            raise HypervisorTimeout(
                f"{what}: libvirtd did not answer in {timeout:g}s (hung or overloaded?"
                f" {self.stuck} call(s) still waiting on it); `virsh list` shows whether it"
                " answers, restarting libvirtd leaves the VMs running"
            ) from None

    def _unstuck(self, fut: asyncio.Future[T]) -> None:
        self.stuck -= 1
        err = None if fut.cancelled() else fut.exception()  # retrieved: nobody awaits it
        log.warning("a libvirt call given up on finished late%s", f" ({err})" if err else "")

    @staticmethod
    def _work(
        loop: asyncio.AbstractEventLoop,
        fn: Callable[[], T],
        fut: asyncio.Future[T],
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            result = fn()
        except BaseException as e:
            _post(loop, _set_exception, fut, e)
        else:
            _post(loop, _set_result, fut, result)
        finally:
            _post(loop, slots.release)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed while the call hung
        loop.call_soon_threadsafe(fn, *args)


def _set_result(fut: asyncio.Future[T], result: T) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[T], e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)
