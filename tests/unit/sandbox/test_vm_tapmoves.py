"""A booted pod's tap move runs in the background: waiting on it gives its result or its
error, a pod torn down first cancels it, and a pod without one waits for nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from criv.errors import Internal
from criv.sandbox.vm.tapmoves import TapMoves


class Mover:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.release = asyncio.Event()
        self.moved: list[tuple[Path, str]] = []
        self.cancelled = False

    async def __call__(self, netns: Path, tap: str) -> None:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fail:
            raise Internal("ip link set: no such device")
        self.moved.append((netns, tap))


async def test_wait_returns_once_the_move_is_done() -> None:
    mover = Mover()
    taps = TapMoves(mover)
    taps.start("p1", Path("/run/netns/p1"), "crivtp1")
    waiter = asyncio.create_task(taps.wait("p1"))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # the move still runs: so does the wait
    mover.release.set()
    await waiter
    assert mover.moved == [(Path("/run/netns/p1"), "crivtp1")]
    await taps.wait("p1")  # done and forgotten: nothing to wait for


async def test_a_failed_move_fails_the_wait() -> None:
    mover = Mover(fail=True)
    taps = TapMoves(mover)
    taps.start("p1", Path("/run/netns/p1"), "crivtp1")
    mover.release.set()
    with pytest.raises(Internal, match="no such device"):
        await taps.wait("p1")


async def test_cancel_stops_a_running_move() -> None:
    mover = Mover()
    taps = TapMoves(mover)
    taps.start("p1", Path("/run/netns/p1"), "crivtp1")
    await asyncio.sleep(0.01)
    await taps.cancel("p1")
    assert mover.cancelled and not mover.moved
    await taps.wait("p1")  # gone: a later wait does not hang
    await taps.cancel("p2")  # a pod that never had one
