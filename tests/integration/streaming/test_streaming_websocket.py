"""Exec and attach over WebSocket, driven by aiohttp's client (independent of criv)."""

from __future__ import annotations

import base64
import json

import aiohttp
import pytest
from streaming_support import Stack

pytestmark = pytest.mark.integration


async def collect(ws: aiohttp.ClientWebSocketResponse, b64: bool = False) -> dict[int, bytes]:
    """Every channel's bytes until the server's Close."""
    out: dict[int, bytes] = {}
    async for msg in ws:
        if b64:
            assert msg.type == aiohttp.WSMsgType.TEXT
            ch, data = int(msg.data[0]), base64.b64decode(msg.data[1:])
        else:
            assert msg.type == aiohttp.WSMsgType.BINARY, msg.type
            ch, data = msg.data[0], msg.data[1:]
        out[ch] = out.get(ch, b"") + data
    return out


@pytest.mark.timeout(30)
async def test_v5_exec_stdin_close_signal_and_status(stack: Stack) -> None:
    url = stack.service.exec_url("c1", ["sh", "-c", "cat; echo err >&2; exit 7"], stdin=True)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=["v5.channel.k8s.io"]) as ws,
    ):
        assert ws.protocol == "v5.channel.k8s.io"
        first = await ws.receive()
        assert first.type == aiohttp.WSMsgType.BINARY and first.data == b"\x01"
        await ws.ping(b"hi")  # must be answered (v5 clients die after 61 s otherwise)
        big = bytes(range(256)) * 400  # > 33 KiB: aiohttp sends it in one frame; fine
        await ws.send_bytes(b"\x00" + big)
        await ws.send_bytes(b"\xff\x00")  # CLOSE signal for stdin: cat sees EOF
        got = await collect(ws)
        assert ws.close_code == 1000
    assert got[1] == big
    assert got[2] == b"err\n"
    status = json.loads(got[3])
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "7"}]


@pytest.mark.timeout(30)
async def test_v5_tty_resize(stack: Stack) -> None:
    url = stack.service.exec_url(
        "c1", ["sh", "-c", "read x; stty size"], tty=True, stdin=True, stderr=False
    )
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=["v5.channel.k8s.io"]) as ws,
    ):
        await ws.receive()
        await ws.send_bytes(b"\x04" + b'{"Width":80,"Height":24}\n')
        await ws.send_bytes(b"\x04" + b'{"Width":132,"Height":50}\n')
        import asyncio

        await asyncio.sleep(0.2)
        await ws.send_bytes(b"\x00go\n")
        got = await collect(ws)
    assert b"50 132" in got[1]
    assert json.loads(got[3])["status"] == "Success"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("protocol", "structured"),
    [
        ("v4.channel.k8s.io", True),
        ("v4.base64.channel.k8s.io", True),
        ("channel.k8s.io", False),
        ("base64.channel.k8s.io", False),
    ],
)
async def test_legacy_exec_protocols(stack: Stack, protocol: str, structured: bool) -> None:
    b64 = "base64" in protocol
    url = stack.service.exec_url("c1", ["sh", "-c", "echo hi; exit 2"])
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=[protocol]) as ws,
    ):
        assert ws.protocol == protocol
        got = await collect(ws, b64)
    assert got[1] == b"hi\n"
    if structured:
        assert json.loads(got[3])["details"]["causes"][0]["message"] == "2"
    else:
        assert got[3].startswith(b"command terminated with non-zero exit code")


@pytest.mark.timeout(30)
async def test_v5_attach_and_text_message_tolerated(stack: Stack) -> None:
    await stack.backend.create_container(
        "ctr", ["sh", "-c", "while true; do echo tick; sleep 0.05; done"]
    )
    url = stack.service.attach_url("ctr", stderr=False)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=["v5.channel.k8s.io"]) as ws,
    ):
        await ws.send_str("this is not binary")  # dropped, not fatal
        data = b""
        while data.count(b"tick") < 3:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.BINARY
            data += msg.data[1:]


@pytest.mark.timeout(30)
async def test_websocket_refusals(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        url = stack.service.exec_url("c1", ["true"])
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await session.ws_connect(url, protocols=["v6.channel.k8s.io"])
        assert exc.value.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await session.ws_connect(url, protocols=["v5.channel.k8s.io"])
        assert exc.value.status == 404  # the refused attempt spent the token
