"""paramiko blocks: its calls run on daemon threads of their own, behind coroutines (never
the default executor, which a hung guest could fill), and post their results to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_thread(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on a daemon thread of its own; a caller that is cancelled stops waiting
    (whoever owns what ``fn`` blocks on must release it)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        try:
            result = fn()
        except BaseException as e:
            post(loop, set_exception, fut, e)
        else:
            post(loop, set_result, fut, result)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await fut


def post(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is gone
        loop.call_soon_threadsafe(fn, *args)


def set_result(fut: asyncio.Future[T], result: T) -> None:
    if not fut.done():
        fut.set_result(result)


def set_exception(fut: asyncio.Future[T], e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)
