"""A vm pod's cold path without a VM: its independent boot steps run together and are all
finished before the undo runs (on failure and on cancellation), the start-up probes run
once in the background and the first pod waits for them only while they run, and the
agent's readiness check tells a listening HTTP/2 server from an accept-and-close."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from criv.config import Config, RuntimeConfig
from criv.errors import Internal
from criv.guestimage import GuestImage
from criv.hypervisor.kvm import AccelChoice
from criv.sandbox.isolation import PodPaths
from criv.sandbox.records import PodRecord
from criv.sandbox.states import PodState
from criv.sandbox.steps import together
from criv.sandbox.vm import VmIsolation, coldpath
from criv.sandbox.vm import host as vmhost
from criv.sandbox.vm.ready import http2_answers
from criv.state.runtime_state import RuntimeState

# -- together ------------------------------------------------------------------------


async def _slow(done: list[str], name: str, gate: asyncio.Event) -> str:
    await gate.wait()
    done.append(name)
    return name


async def _fail(msg: str) -> None:
    raise Internal(msg)


async def test_together_returns_results_in_order() -> None:
    async def value(v: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return v

    assert await together(value(1, 0.02), value(2, 0), value(3, 0.01)) == [1, 2, 3]


async def test_together_raises_the_first_error_only_once_every_step_finished() -> None:
    done: list[str] = []
    gate = asyncio.Event()
    run = asyncio.create_task(together(_slow(done, "backend", gate), _fail("tap"), _fail("x")))
    await asyncio.sleep(0.01)
    assert not run.done(), "a step still runs: the undo must not start yet"
    gate.set()
    with pytest.raises(Internal, match="tap"):
        await run
    assert done == ["backend"], "the sibling was left to finish, not cancelled"


async def test_together_cancelled_waits_for_its_steps_and_does_not_cancel_them() -> None:
    done: list[str] = []
    gate = asyncio.Event()
    run = asyncio.create_task(together(_slow(done, "virtiofsd", gate)))
    await asyncio.sleep(0.01)
    run.cancel()
    await asyncio.sleep(0.01)
    assert not run.done(), "cancelled, but its step still runs"
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert done == ["virtiofsd"]


# -- VmIsolation.boot undo with parallel steps ------------------------------------------


def _pod(tmp: Path) -> PodRecord:
    return PodRecord(
        id="cd" * 32, name="p", namespace="n", uid="u", attempt=0, state=PodState.PENDING,
        created_at_ns=1, handler="", isolation="vm", config=b"", netns=str(tmp / "netns"),
    )  # fmt: skip


def _iso(tmp: Path, handlers: dict[str, Any] | None = None) -> VmIsolation:
    cfg = Config(state_dir=str(tmp / "state"), run_dir=str(tmp / "run"))
    if handlers is not None:
        cfg = dataclasses.replace(cfg, runtime=RuntimeConfig(handlers=handlers))
    return VmIsolation(cfg, RuntimeState(tmp))


STEPS = ("start_backend", "start_share", "make_tap", "host_ready")


def _stub_steps(
    iso: VmIsolation,
    events: list[str],
    steps: dict[str, Callable[[], Awaitable[Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def nothing() -> None:
        return None

    async def destroy(pod: PodRecord, paths: PodPaths) -> None:
        events.append("destroy")

    async def ok(v: Any) -> Any:
        return v

    defaults: dict[str, Callable[[], Awaitable[Any]]] = {
        "start_backend": lambda: ok((1, 2)),
        "start_share": lambda: ok(3),
        "make_tap": lambda: ok(""),
        "host_ready": lambda: ok(AccelChoice("tcg", "test")),
    }
    host: Any = iso._host
    host.preflight = nothing
    host.guest_image = lambda: GuestImage(Path("/k"), Path("/i"), "h", root_disk=Path("/r"))
    for name, fn in (defaults | steps).items():
        monkeypatch.setattr(coldpath, name, lambda *_a, fn=fn: fn())
    iso.destroy = destroy  # type: ignore[method-assign]


@pytest.mark.parametrize("failing", STEPS)
async def test_a_failing_boot_step_is_undone_after_every_parallel_step_finished(
    tmp_path: Path, failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    results = {
        "start_backend": (1, 2),
        "start_share": 3,
        "make_tap": "crivt",
        "host_ready": AccelChoice("tcg", "test"),
    }

    def step(name: str) -> Callable[[], Awaitable[Any]]:
        async def run() -> Any:
            if name == failing:
                raise Internal(f"{name} failed")
            await asyncio.sleep(0.02)  # the others take longer than the failing one
            events.append(name)
            return results[name]

        return run

    iso = _iso(tmp_path)
    _stub_steps(iso, events, {n: step(n) for n in results}, monkeypatch)
    paths = PodPaths(state=tmp_path / "s", run=tmp_path / "r")
    with pytest.raises(Internal, match=failing):
        await iso.boot(_pod(tmp_path), paths)
    assert events[-1] == "destroy" and events.count("destroy") == 1
    assert sorted(events[:-1]) == sorted(n for n in results if n != failing)


async def test_a_boot_cancelled_mid_step_is_undone_after_its_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    gate, started = asyncio.Event(), asyncio.Event()

    async def spawning() -> tuple[int, int]:
        started.set()
        await gate.wait()  # as a worker thread spawning the backend would
        events.append("backend")
        return 1, 2

    async def never() -> None:
        await asyncio.Event().wait()

    iso = _iso(tmp_path)
    _stub_steps(iso, events, {"start_backend": spawning, "start_share": never}, monkeypatch)
    boot = asyncio.create_task(
        iso.boot(_pod(tmp_path), PodPaths(state=tmp_path / "s", run=tmp_path / "r"))
    )
    # cancel once the steps run: the preflight's thread hops before them take their time
    await asyncio.wait_for(started.wait(), 10)
    boot.cancel()
    await asyncio.sleep(0.02)
    assert events == [], "no undo while a step still runs"
    gate.set()
    await asyncio.sleep(0.02)
    assert events[:1] == ["backend"]
    # the step that never ends keeps the undo waiting too: cancel it the hard way
    for t in asyncio.all_tasks():
        if t is not asyncio.current_task() and t is not boot:
            t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await boot
    assert events == ["backend", "destroy"]


# -- start-up probes ---------------------------------------------------------------------


class FakeHv:
    def __init__(self, gate: asyncio.Event, calls: list[str]) -> None:
        self.gate, self.calls = gate, calls

    async def probe_capabilities(self) -> None:
        self.calls.append("caps")
        await self.gate.wait()


@contextlib.asynccontextmanager
async def _probing(
    tmp: Path, monkeypatch: pytest.MonkeyPatch, handlers: dict[str, Any] | None = None
) -> AsyncIterator[tuple[VmIsolation, asyncio.Event, list[str]]]:
    gate = asyncio.Event()
    calls: list[str] = []
    image = tmp / "vmlinux"
    image.write_bytes(b"k")

    def choose(
        wanted: str, cache: Path, kernel: Path, initrd: Path, root_disk: Path | None = None
    ) -> AccelChoice:
        calls.append(f"kvm-probe {kernel.name}")
        return AccelChoice("tcg", "probed")

    monkeypatch.setattr(vmhost, "choose_accel", choose)
    monkeypatch.setattr(vmhost.VmHost, "guest_image", lambda self: GuestImage(image, image, "h"))
    hv = FakeHv(gate, calls)

    async def hypervisor(self: vmhost.VmHost) -> FakeHv:
        return hv

    monkeypatch.setattr(vmhost.VmHost, "hypervisor", hypervisor)
    iso = _iso(tmp, handlers)
    try:
        yield iso, gate, calls
    finally:
        gate.set()
        await iso._host.close()


async def test_start_up_probes_run_once_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _probing(tmp_path, monkeypatch) as (iso, gate, calls):
        await asyncio.sleep(0.02)
        assert sorted(calls) == ["caps", "kvm-probe vmlinux"], "started without any pod"
        assert iso._host._accel is not None
        # a pod now waits for the libvirt probe that still runs, then the choice is made
        ready = coldpath.host_ready(
            iso._host, GuestImage(tmp_path / "vmlinux", tmp_path / "i", "h")
        )
        waiter = asyncio.create_task(ready)
        await asyncio.sleep(0.02)
        assert not waiter.done()
        gate.set()
        assert (await waiter).reason == "probed"
        assert sorted(calls) == ["caps", "kvm-probe vmlinux"], "not probed again"


async def test_a_pod_after_the_probes_does_not_wait_and_a_host_only_criv_does_not_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _probing(tmp_path, monkeypatch) as (iso, gate, calls):
        gate.set()
        await asyncio.sleep(0.02)
        assert iso._host._probes is not None and iso._host._probes.done()
        await asyncio.wait_for(iso._host.probed(), 1)
    host_only = tmp_path / "h"
    host_only.mkdir()
    async with _probing(host_only, monkeypatch, {"": "host"}) as (iso, gate, calls):
        await asyncio.sleep(0.02)
        assert calls == [] and iso._host._probes is None


async def test_a_pod_that_gives_up_does_not_cancel_the_probes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _probing(tmp_path, monkeypatch) as (iso, gate, _):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(iso._host.probed(), 0.02)
        probes = iso._host._probes
        assert probes is not None and not probes.done()
        gate.set()
        await asyncio.wait_for(iso._host.probed(), 1)
        assert probes.done() and not probes.cancelled()


# -- readiness --------------------------------------------------------------------------


async def _server(path: Path, answer: bytes | None) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if answer is None:  # what the backend does before the guest listens
            w.close()
            return
        await r.readexactly(9)
        w.write(answer)
        await w.drain()
        await asyncio.sleep(0.05)
        w.close()

    return await asyncio.start_unix_server(handle, str(path))


async def test_readiness_tells_a_listening_http2_server_from_an_accept_and_close(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "vs.1024"
    assert not await http2_answers(sock, 0.5), "no socket yet"
    srv = await _server(sock, None)
    assert not await http2_answers(sock, 0.5)
    srv.close()
    sock.unlink()
    srv = await _server(sock, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    assert await http2_answers(sock, 0.5)
    srv.close()


async def test_readiness_sees_a_grpc_server(tmp_path: Path) -> None:
    sock = tmp_path / "vs.1024"
    srv = grpc.aio.server()
    srv.add_insecure_port(f"unix:{sock}")
    await srv.start()
    try:
        assert await http2_answers(sock, 2.0)
    finally:
        await srv.stop(None)
