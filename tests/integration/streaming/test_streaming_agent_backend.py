"""AgentStreamingBackend behind the real server, with a stand-in agent link."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from streaming_support import EchoServer, free_port

from criv.config import StreamingConfig
from criv.streaming.agent_backend import AgentStreamingBackend, DataStreamParams
from criv.streaming.server import StreamingServer
from criv.streaming.service import StreamingService
from tests.support.spdy_client import SpdyClient, forward_one, spdy_exec

pytestmark = pytest.mark.integration


class FakeLink:
    """Plays criv/agent's side: the 'agent' dials 127.0.0.1:port, or refuses."""

    def __init__(self) -> None:
        self.opened: list[tuple[str, DataStreamParams]] = []

    async def start_exec(
        self, container_id: str, cmd: list[str], tty: bool, stdin: bool
    ) -> tuple[str, str]:
        raise RuntimeError(f"agent: container {container_id} is not running")

    async def attach_target(self, container_id: str) -> tuple[str, str]:
        raise RuntimeError(f"container {container_id} is exited, not running")

    async def open_data_stream(
        self, sandbox_id: str, params: DataStreamParams
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.opened.append((sandbox_id, params))
        try:
            return await asyncio.open_connection("127.0.0.1", params.port)
        except OSError as e:
            raise RuntimeError(f"agent: connect 127.0.0.1:{params.port}: {e.strerror}") from e


@pytest.fixture
async def agent_service() -> AsyncIterator[tuple[StreamingService, FakeLink]]:
    link = FakeLink()
    server = StreamingServer(StreamingConfig(), AgentStreamingBackend(link))
    await server.start()
    try:
        yield StreamingService(server), link
    finally:
        await server.stop()


@pytest.mark.timeout(30)
async def test_agent_port_forward(
    agent_service: tuple[StreamingService, FakeLink], echo_server: EchoServer
) -> None:
    svc, link = agent_service
    _resp, c = await SpdyClient.connect(svc.port_forward_url("sb9"), ["portforward.k8s.io"])
    assert c is not None
    payloads = [os.urandom(20_000) for _ in range(4)]
    got = await asyncio.gather(
        *(forward_one(c, echo_server.port, i, p) for i, p in enumerate(payloads))
    )
    assert got == payloads
    assert {(s, p.kind, p.port) for s, p in link.opened} == {
        ("sb9", "port_forward", echo_server.port)
    }
    port = free_port()
    err = await c.open_stream({"streamtype": "error", "port": str(port), "requestid": "9"})
    await c.open_stream({"streamtype": "data", "port": str(port), "requestid": "9"})
    text = await c.read_stream(err)
    assert text.startswith(f"error forwarding port {port} to pod sb9".encode())
    assert b"agent: connect" in text
    await c.close()


@pytest.mark.timeout(30)
async def test_agent_refusals_are_clear_statuses(
    agent_service: tuple[StreamingService, FakeLink],
) -> None:
    svc, _ = agent_service
    r = await spdy_exec(svc.exec_url("c1", ["true"]))
    assert r.status["reason"] == "InternalError"
    assert "container c1 is not running" in str(r.status["message"])
    r = await spdy_exec(svc.attach_url("c1"))
    assert r.status["reason"] == "InternalError"
    assert "container c1 is exited, not running" in str(r.status["message"])
