"""criv/hypervisor/calls.py: a blocking call past its deadline releases its caller with
UNAVAILABLE; stuck calls hold their slots; a call given up before it started never runs."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from criv.errors import HypervisorTimeout, NotFound
from criv.hypervisor.calls import DeadlineCalls


async def test_result_and_exception_pass_through() -> None:
    calls = DeadlineCalls(2, "t")
    assert await calls.run(lambda: 42, "answer", 5) == 42

    def fail() -> int:
        raise NotFound("no such domain")

    with pytest.raises(NotFound):
        await calls.run(fail, "lookup", 5)


async def test_hung_call_releases_caller_and_later_calls_queue_then_time_out() -> None:
    calls = DeadlineCalls(1, "t")
    release = threading.Event()
    ran: list[str] = []

    def hang() -> str:
        release.wait(30)
        return "late"

    with pytest.raises(HypervisorTimeout) as e:
        await calls.run(hang, "creating domain criv-x", 0.2)
    assert e.value.code is grpc.StatusCode.UNAVAILABLE
    assert "creating domain criv-x" in e.value.message
    assert calls.stuck == 1
    # the only slot is held by the stuck call: the next one waits, times out, never runs
    with pytest.raises(HypervisorTimeout):
        await calls.run(lambda: ran.append("queued") or "x", "listing domains", 0.2)
    release.set()
    for _ in range(100):
        if calls.stuck == 0:
            break
        await asyncio.sleep(0.02)
    assert calls.stuck == 0
    assert await calls.run(lambda: "ok", "after", 5) == "ok"
    assert ran == []


async def test_a_hung_libvirtd_releases_the_drivers_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    from criv.hypervisor.driver import Hypervisor

    hv = Hypervisor("test:///default", call_timeout=0.2)
    release = threading.Event()

    class HungConnection:
        def lookupByName(self, name: str) -> None:
            release.wait(30)

    monkeypatch.setattr(hv, "_connection", HungConnection)
    try:
        with pytest.raises(HypervisorTimeout, match="looking up domain criv-x"):
            await hv.lookup("criv-x")
    finally:
        release.set()
