"""Server-level behaviour: TLS, raw WebSocket framing details, routing errors."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import subprocess
from pathlib import Path

import aiohttp
import pytest
from streaming_support import Stack

from criv.config import StreamingConfig
from criv.streaming.local import LocalProcessBackend
from criv.streaming.server import StreamingServer
from criv.streaming.service import StreamingService
from tests.support.spdy_client import http_request, spdy_exec

pytestmark = pytest.mark.integration


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame, built by hand from RFC 6455."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_ws_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    assert not b1 & 0x80, "server frames must be unmasked"
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b0 & 0x0F, await reader.readexactly(n)


@pytest.mark.timeout(30)
async def test_raw_websocket_fragments_ping_and_close(stack: Stack) -> None:
    url = stack.service.exec_url("c1", ["cat"], stdin=True, stderr=False)
    key = base64.b64encode(os.urandom(16)).decode()
    resp, reader, writer = await http_request(
        url,
        "GET",
        [
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
        ],
    )
    assert resp.status == 101
    assert resp.get("Sec-WebSocket-Protocol") == "v5.channel.k8s.io"
    assert resp.get("Sec-WebSocket-Extensions") is None
    assert await read_ws_frame(reader) == (2, b"\x01")  # the initial empty stdout message
    payload = os.urandom(70_000)
    msg = b"\x00" + payload
    # One message in three fragments, with a Ping between them.
    writer.write(ws_frame(2, msg[:10], fin=False))
    writer.write(ws_frame(9, b"ka"))
    writer.write(ws_frame(0, msg[10:40_000], fin=False))
    writer.write(ws_frame(0, msg[40_000:], fin=True))
    writer.write(ws_frame(2, b"\xff\x00"))
    await writer.drain()
    out = b""
    status = b""
    pongs = []
    while True:
        op, data = await read_ws_frame(reader)
        if op == 0xA:
            pongs.append(data)
        elif op == 2 and data[0] == 1:
            out += data[1:]
        elif op == 2 and data[0] == 3:
            status += data[1:]
        elif op == 8:
            assert struct.unpack("!H", data[:2])[0] == 1000
            break
    assert pongs == [b"ka"]
    assert out == payload
    assert json.loads(status)["status"] == "Success"
    writer.write(ws_frame(8, struct.pack("!H", 1000)))
    await writer.drain()
    assert await reader.read() == b""  # the server closes after the echo
    writer.close()


@pytest.mark.timeout(30)
async def test_unknown_paths_and_methods(stack: Stack) -> None:
    base = stack.server.base_url
    resp, _, w = await http_request(f"{base}/nothing/here", "GET", [])
    assert resp.status == 404
    w.close()
    url = stack.service.exec_url("c1", ["true"])
    resp, _, w = await http_request(url, "PUT", [])
    assert resp.status == 405
    w.close()
    url = stack.service.exec_url("c1", ["true"])
    resp, _, w = await http_request(
        url, "POST", [("X-Stream-Protocol-Version", "v4.channel.k8s.io")]
    )
    assert resp.status == 400 and b"missing upgrade headers" in resp.body
    w.close()


@pytest.mark.timeout(30)
async def test_backend_failure_is_reported_as_status(stack: Stack) -> None:
    url = stack.service.exec_url("c1", ["/nonexistent/binary"])
    r = await spdy_exec(url)
    st = r.status
    assert st["reason"] == "InternalError" and st["code"] == 500
    assert "error executing command in container" in str(st["message"])
    url = stack.service.attach_url("no-such-container")
    r = await spdy_exec(url)
    assert "error attaching to container" in str(r.status["message"])


@pytest.mark.timeout(30)
async def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    backend = LocalProcessBackend()
    server = StreamingServer(StreamingConfig(tls_cert=str(cert), tls_key=str(key)), backend)
    await server.start()
    try:
        svc = StreamingService(server)
        url = svc.exec_url("c1", ["echo", "secure"], stderr=False)
        assert url.startswith("https://127.0.0.1:")
        r = await spdy_exec(url, stderr=False)
        assert r.stdout == b"secure\n"
        url = svc.exec_url("c1", ["echo", "wss"], stderr=False)
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, protocols=["v5.channel.k8s.io"], ssl=False) as ws,
        ):
            data = b""
            async for msg in ws:
                if msg.data[0] == 1:
                    data += msg.data[1:]
        assert data == b"wss\n"
    finally:
        await server.stop()
        await backend.close()
