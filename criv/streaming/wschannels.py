"""Everything carried over WebSocket: channel-framed exec/attach, the legacy channel
port-forward, and the byte-stream adapter for SPDY tunnelled in WebSocket messages.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import logging
import struct

from criv.errors import CrivError
from criv.streaming.backend import StreamingBackend
from criv.streaming.remotecommand import SessionIO, run_session
from criv.streaming.requests import AttachRequest, ExecRequest, PortForwardRequest
from criv.streaming.websocket import OP_BINARY, WebSocket

log = logging.getLogger("criv.streaming.websocket")

WS_V5 = "v5.channel.k8s.io"
WS_V4 = "v4.channel.k8s.io"
WS_V4_BASE64 = "v4.base64.channel.k8s.io"
WS_V1 = "channel.k8s.io"
WS_V1_BASE64 = "base64.channel.k8s.io"
TUNNEL_PORTFORWARD = "SPDY/3.1+portforward.k8s.io"

# Subprotocols per route; "" is the legacy no-subprotocol offer.
EXEC_PROTOCOLS = (WS_V5, WS_V4, WS_V4_BASE64, WS_V1, WS_V1_BASE64, "")
PORTFORWARD_PROTOCOLS = (TUNNEL_PORTFORWARD, WS_V4, WS_V4_BASE64, "")

STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)
# Unread client bytes held per input channel before the connection's reader waits.
IN_BUFFER = 1024 * 1024
CLOSE_SIGNAL = 255


def is_base64(protocol: str) -> bool:
    return "base64" in protocol


def remotecommand_version(protocol: str) -> str:
    """The remotecommand semantics (status format) a WebSocket subprotocol implies."""
    return WS_V5 if protocol == WS_V5 else WS_V4 if protocol.startswith("v4.") else WS_V1


class ChannelWriter:
    """Frames outgoing messages: ``[channel]+data``, or ``'0'+channel`` + base64 as text."""

    def __init__(self, ws: WebSocket, protocol: str) -> None:
        self.ws = ws
        self.base64 = is_base64(protocol)

    async def send(self, channel: int, data: bytes) -> None:
        if self.base64:
            self.ws.send_text(bytes([ord("0") + channel]) + base64.b64encode(data))
        else:
            self.ws.send_binary(bytes([channel]) + data)
        await self.ws.drain()

    def decode(self, op: int, message: bytes) -> tuple[int, bytes] | None:
        """(channel, payload) of an incoming message; None to drop it."""
        if not message:
            return None
        if not self.base64:
            return message[0], message[1:]
        try:
            return message[0] - ord("0"), base64.b64decode(message[1:], validate=True)
        except (binascii.Error, ValueError):
            return None


class _Out:
    def __init__(self, w: ChannelWriter, channel: int) -> None:
        self._w = w
        self._channel = channel

    async def write(self, data: bytes) -> None:
        await self._w.send(self._channel, data)

    async def close(self) -> None:
        pass  # channels have no end-of-data signal from the server; the Close frame is it


class _In:
    """One input channel's messages, bounded in bytes: ``put`` waits (and with it the
    connection's reader) while more than ``limit`` bytes are unread. A channel nobody
    reads (``discard``) drops what arrives."""

    def __init__(self, limit: int = IN_BUFFER, discard: bool = False) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._limit = limit
        self._discard = discard
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self.eof = False

    async def read(self) -> bytes:
        while not self._chunks:
            if self.eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._bytes -= len(data)
        self._room.set()
        return data

    async def put(self, data: bytes) -> None:
        if self.eof or not data or self._discard:
            return
        self._chunks.append(data)
        self._bytes += len(data)
        self._readable.set()
        while self._bytes > self._limit and not self.eof:
            self._room.clear()
            await self._room.wait()

    def end(self) -> None:
        self.eof = True
        self._readable.set()
        self._room.set()


async def serve_remotecommand(
    ws: WebSocket,
    protocol: str,
    backend: StreamingBackend,
    request: ExecRequest | AttachRequest,
) -> None:
    writer = ChannelWriter(ws, protocol)
    version = remotecommand_version(protocol)
    stdin = _In() if request.stdin else None
    resize = _In(discard=not request.tty)  # channel 4 is always accepted; read under a tty
    inputs = {STDIN: stdin, RESIZE: resize}
    gone = asyncio.Event()

    async def reader() -> None:
        while (msg := await ws.receive()) is not None:
            decoded = writer.decode(*msg)
            if decoded is None:
                continue
            channel, payload = decoded
            if channel == CLOSE_SIGNAL and version == WS_V5:
                target = inputs.get(payload[0]) if len(payload) == 1 else None
                if len(payload) != 1 or payload[0] > RESIZE:
                    log.info("bad v5 close signal; closing the connection")
                    break
                if target is not None:
                    target.end()
                continue
            target = inputs.get(channel)
            if target is not None:
                await target.put(payload)
            # anything else (output channels, out of range): discarded, as the library does
        for ch in inputs.values():
            if ch is not None:
                ch.end()
        gone.set()

    ws.owned = True
    reader_task = asyncio.create_task(reader())
    try:
        # The initial empty message on the lowest enabled output channel.
        first = STDOUT if request.stdout else STDERR if request.stderr else ERROR
        await writer.send(first, b"")
        io = SessionIO(
            version=version,
            error=_Out(writer, ERROR),
            stdin=stdin,
            stdout=_Out(writer, STDOUT) if request.stdout else None,
            stderr=_Out(writer, STDERR) if request.stderr and not request.tty else None,
            resize=resize if request.tty else None,
        )
        if await run_session(backend, request, io, gone):
            await ws.close()
    finally:
        reader_task.cancel()
        await asyncio.gather(reader_task, return_exceptions=True)


async def serve_legacy_portforward(
    ws: WebSocket,
    protocol: str,
    backend: StreamingBackend,
    request: PortForwardRequest,
) -> None:
    """Channel 2i carries port i's data, 2i+1 its errors; one connection per port."""
    writer = ChannelWriter(ws, protocol)
    ports = request.ports
    inputs = [_In() for _ in ports]
    for i, port in enumerate(ports):
        prefix = struct.pack("<H", port)
        await writer.send(2 * i, prefix)
        await writer.send(2 * i + 1, prefix)

    async def reader() -> None:
        while (msg := await ws.receive()) is not None:
            decoded = writer.decode(*msg)
            if decoded is None:
                continue
            channel, payload = decoded
            if channel % 2 == 0 and channel // 2 < len(inputs):
                await inputs[channel // 2].put(payload)
        for ch in inputs:
            ch.end()

    async def forward(i: int, port: int) -> None:
        try:
            target = await backend.port_forward(request.sandbox_id, port)
        except (CrivError, OSError) as e:
            cause = getattr(e, "message", None) or str(e)
            msg = f"error forwarding port {port} to pod {request.sandbox_id}, uid : {cause}"
            inputs[i].end()  # nobody will read it: what the client sends there is dropped
            await writer.send(2 * i + 1, msg.encode())
            return

        async def up() -> None:
            while data := await inputs[i].read():
                await target.write(data)
            await target.close_write()

        up_task = asyncio.create_task(up())
        try:
            while data := await target.read(32 * 1024):
                await writer.send(2 * i, data)
        finally:
            up_task.cancel()
            await asyncio.gather(up_task, return_exceptions=True)
            await target.close()

    ws.owned = True
    reader_task = asyncio.create_task(reader())
    try:
        forwards = [asyncio.create_task(forward(i, p)) for i, p in enumerate(ports)]
        await asyncio.wait({reader_task, *forwards}, return_when=asyncio.ALL_COMPLETED)
    finally:
        for t in (reader_task, *forwards):
            t.cancel()
        await asyncio.gather(reader_task, *forwards, return_exceptions=True)
    await ws.close()


class TunnelSource:
    """The SPDY byte stream reassembled from binary messages (boundaries mean nothing)."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws
        self._buf = bytearray()

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            msg = await self._ws.receive()
            if msg is None:  # Close 1000 (or any end): EOF of the SPDY stream
                raise asyncio.IncompleteReadError(bytes(self._buf), n)
            op, data = msg
            if op == OP_BINARY:
                self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


class TunnelSink:
    """Our SPDY frames as binary messages, one message per frame."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws

    def write(self, data: bytes) -> None:
        self._ws.send_binary(data)

    async def drain(self) -> None:
        await self._ws.drain()

    def is_closing(self) -> bool:
        return self._ws.is_closing()

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self._ws.transport
