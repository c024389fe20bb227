"""Port-forward over SPDY, over SPDY tunnelled in WebSocket, and the legacy channel form."""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

import aiohttp
import pytest
from streaming_support import EchoServer, Stack, free_port

from tests.support.spdy_client import SpdyClient, forward_one

pytestmark = pytest.mark.integration


async def check_session(c: SpdyClient, echo: EchoServer) -> None:
    # Two sequential connections, then 8 concurrent ones.
    for rid in (0, 1):
        payload = os.urandom(100_000)
        assert await forward_one(c, echo.port, rid, payload) == payload
    payloads = [os.urandom(50_000 + i) for i in range(8)]

    async def one(i: int) -> bytes:
        return await forward_one(c, echo.port, 2 + i, payloads[i])

    results = await asyncio.gather(*(one(i) for i in range(8)))
    assert results == payloads


@pytest.mark.timeout(30)
async def test_spdy_portforward_concurrent(stack: Stack, echo_server: EchoServer) -> None:
    url = stack.service.port_forward_url("sb1")
    resp, c = await SpdyClient.connect(url, ["portforward.k8s.io"])
    assert resp.status == 101 and resp.get("X-Stream-Protocol-Version") == "portforward.k8s.io"
    assert c is not None
    await check_session(c, echo_server)
    await c.close()


@pytest.mark.timeout(30)
async def test_spdy_portforward_refused_and_bad_headers(stack: Stack) -> None:
    url = stack.service.port_forward_url("sb1")
    _resp, c = await SpdyClient.connect(url, ["portforward.k8s.io"])
    assert c is not None
    port = free_port()
    err = await c.open_stream({"streamtype": "error", "port": str(port), "requestid": "0"})
    await c.write(err, b"", fin=True)
    data = await c.open_stream({"streamtype": "data", "port": str(port), "requestid": "0"})
    text = await c.read_stream(err)
    assert text.startswith(f"error forwarding port {port} to pod sb1".encode()), text
    await c.read_stream(data)
    for headers in (
        {"streamtype": "data", "requestid": "1"},
        {"streamtype": "data", "port": "0", "requestid": "1"},
        {"streamtype": "data", "port": "http", "requestid": "1"},
        {"streamtype": "bogus", "port": "80", "requestid": "1"},
    ):
        s = await c.open_stream(headers)
        assert s.reset == 5 and not s.replied.is_set(), headers
    await c.close()


class _WsWriter:
    """A StreamWriter look-alike sending SPDY bytes as tiny binary messages."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.pending.append(data)

    async def drain(self) -> None:
        while self.pending:
            data = self.pending.pop(0)
            # Split every frame 4-byte, 1-byte, rest: boundaries must not matter.
            for piece in (data[:4], data[4:5], data[5:]):
                if piece:
                    await self.ws.send_bytes(piece)

    def close(self) -> None:
        pass


async def _ws_to_reader(ws: aiohttp.ClientWebSocketResponse, reader: asyncio.StreamReader) -> None:
    async for msg in ws:
        assert msg.type == aiohttp.WSMsgType.BINARY, msg.type
        reader.feed_data(msg.data)
    reader.feed_eof()


@pytest.mark.timeout(30)
async def test_tunnelled_spdy_portforward(stack: Stack, echo_server: EchoServer) -> None:
    url = stack.service.port_forward_url("sb1")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=["SPDY/3.1+portforward.k8s.io"]) as ws,
    ):
        assert ws.protocol == "SPDY/3.1+portforward.k8s.io"
        reader = asyncio.StreamReader()
        pump = asyncio.create_task(_ws_to_reader(ws, reader))
        writer: Any = _WsWriter(ws)
        c = SpdyClient(reader, writer)
        loop_task = asyncio.create_task(c._read_loop())
        await c.ping(1)
        await asyncio.wait_for(c.pong_event.wait(), 5)
        await check_session(c, echo_server)
        await ws.close()  # Close 1000 ends the session
        await asyncio.wait_for(pump, 5)
        await asyncio.wait_for(loop_task, 5)
        assert ws.close_code == 1000


@pytest.mark.timeout(30)
@pytest.mark.parametrize("protocol", ["v4.channel.k8s.io", "v4.base64.channel.k8s.io"])
async def test_legacy_websocket_portforward(
    stack: Stack, echo_server: EchoServer, protocol: str
) -> None:
    import base64

    b64 = "base64" in protocol
    url = stack.service.port_forward_url("sb1", [echo_server.port])

    def decode(msg: aiohttp.WSMessage) -> tuple[int, bytes]:
        if b64:
            assert msg.type == aiohttp.WSMsgType.TEXT
            return int(msg.data[0]), base64.b64decode(msg.data[1:])
        assert msg.type == aiohttp.WSMsgType.BINARY
        return msg.data[0], msg.data[1:]

    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=[protocol]) as ws,
    ):
        assert ws.protocol == protocol
        prefix = struct.pack("<H", echo_server.port)
        assert decode(await ws.receive()) == (0, prefix)
        assert decode(await ws.receive()) == (1, prefix)
        if b64:
            await ws.send_str("0" + base64.b64encode(b"ping!").decode())
        else:
            await ws.send_bytes(b"\x00ping!")
        got = b""
        while got != b"ping!":
            ch, data = decode(await ws.receive())
            assert ch == 0
            got += data


@pytest.mark.timeout(30)
async def test_unsupported_websocket_protocol_is_refused(stack: Stack) -> None:
    url = stack.service.port_forward_url("sb1")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await session.ws_connect(url, protocols=["v5.channel.k8s.io"])
        assert exc.value.status == 403
