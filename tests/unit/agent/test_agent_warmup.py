"""The agent's warm-up (criv_agent/warmup.py): only when no call came for WARM_AFTER s of
running time, a Health call to itself over its real gRPC socket, and never a failure; and
its page-cache drop (criv_agent/pagecache.py): page cache only, never a failure."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from criv_agent import pagecache, rtnetlink, warmup
from criv_agent.api.agent.v1 import agent_pb2_grpc
from criv_agent.runtime import Runtime
from criv_agent.service import AgentService


async def _served(tmp_path: Path) -> tuple[grpc.aio.Server, AgentService, str]:
    service = AgentService(Runtime(str(tmp_path / "state"), "crun"))
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServicer_to_server(service, server)
    path = str(tmp_path / "control.sock")
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    return server, service, path


@pytest.mark.timeout(30)
def test_an_idle_agent_warms_itself_through_its_own_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(warmup, "WARM_AFTER", 0.2)
    reads: list[rtnetlink.Request] = []
    real_call = rtnetlink.RtNetlink.call

    def call(self: rtnetlink.RtNetlink, req: rtnetlink.Request) -> None:
        reads.append(req)
        real_call(self, req)  # this host's loopback, read for real

    monkeypatch.setattr(rtnetlink.RtNetlink, "call", call)
    ips: list[bytes] = []

    async def ip_reads() -> None:
        ips.append(warmup.IP_READS)

    monkeypatch.setattr(warmup, "_ip_reads", ip_reads)

    async def go() -> None:
        server, service, path = await _served(tmp_path)
        try:
            await warmup.warm_when_idle(service.first_call, path)
            # the call reached the real service: Health marked it
            assert service.first_call.is_set()
        finally:
            await server.stop(None)

    caplog.set_level("INFO")
    asyncio.run(go())
    assert [r.type for r in reads] == [rtnetlink.RTM_GETLINK]  # it only reads
    assert ips == [warmup.IP_READS]
    assert "warm-up done" in caplog.text and "warm-up failed" not in caplog.text


@pytest.mark.timeout(30)
def test_a_call_before_the_wait_ends_calls_the_warm_up_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(warmup, "WARM_AFTER", 5.0)
    called: list[str] = []

    async def health(path: str) -> None:
        called.append(path)

    monkeypatch.setattr(warmup, "_health", health)

    async def go() -> None:
        first = asyncio.Event()
        task = asyncio.ensure_future(warmup.warm_when_idle(first, "/nowhere"))
        await asyncio.sleep(0.1)
        first.set()  # the host's Health
        await asyncio.wait_for(task, 2)

    asyncio.run(go())
    assert called == []


@pytest.mark.timeout(30)
def test_a_failed_warm_up_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(warmup, "WARM_AFTER", 0.05)
    asyncio.run(warmup.warm_when_idle(asyncio.Event(), "/nonexistent/control.sock"))
    assert "warm-up failed" in caplog.text


def test_the_warm_up_outlasts_the_template_settle() -> None:
    """A template is saved SETTLE_SECONDS after its agent serves: its agent must not have
    warmed up by then (that would only waste the template's time), with a second to spare
    for a busy host's pause; a spare (a clone) warms up that second after it resumes."""
    from criv.sandbox.vm.template import SETTLE_SECONDS

    assert warmup.WARM_AFTER >= SETTLE_SECONDS + 1


# -- the page-cache drop (criv_agent/pagecache.py) ----------------------------------------


@pytest.mark.timeout(10)
def test_the_drop_asks_for_clean_page_cache_only(tmp_path: Path) -> None:
    knob = tmp_path / "drop_caches"
    knob.write_text("")
    pagecache.drop_clean_pages(str(knob))
    assert knob.read_text() == "1\n"  # 1: page cache; not 2 or 3 (dentries and inodes)


@pytest.mark.timeout(10)
def test_a_drop_that_fails_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pagecache.drop_clean_pages(str(tmp_path / "no" / "such"))
    assert "dropping the page cache failed" in caplog.text
