"""A small RFC 6455 server endpoint over asyncio streams.

Written here rather than borrowed because the handshake must follow the Kubernetes
rules exactly (403 on no matching subprotocol, echo the chosen one, no extensions) and
the SPDY tunnel needs raw access to binary messages. Server frames are unmasked; client
frames are masked; fragmented client messages are reassembled (gorilla fragments
anything over ~33 KiB); every Ping is answered with a Pong carrying its payload.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import struct
from collections.abc import Callable

from criv.streaming.limits import PongGuard

log = logging.getLogger("criv.streaming.websocket")

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009

# Clients write at most 32 KiB + 1 per message; anything near this limit is an attack.
MAX_MESSAGE = 16 * 1024 * 1024


def accept_key(key: str) -> str:
    digest = hashlib.sha1((key.strip() + GUID).encode(), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode()


def _unmask(mask: bytes, data: bytes) -> bytes:
    n = len(data)
    if n == 0:
        return data
    # XOR as one big integer: much faster in CPython than a per-byte loop.
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One frame; ``mask`` is for clients (tests, benchmark), servers send unmasked."""
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if mask is not None:
        return head + mask + _unmask(mask, payload)
    return head + payload


class WebSocketClosed(Exception):
    pass


class WebSocket:
    """A server-side connection after a successful handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.close_sent = False
        self.close_code: int | None = None  # what the client's Close frame carried
        self.ended = asyncio.Event()  # receive() saw Close, EOF or a protocol error
        self._reading = False
        # Set by a session that runs its own reader task; close() then only waits for it.
        self.owned = False
        # Called when a data message moves either way (the idle timeout); the SPDY tunnel
        # leaves it unset and counts SPDY data frames instead.
        self.on_activity: Callable[[], None] | None = None
        self._pongs = PongGuard()

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self._writer.transport

    async def _read_frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = await self._reader.readexactly(2)
        fin = bool(b0 & 0x80)
        opcode = b0 & 0x0F
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self._reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self._reader.readexactly(8))
        if n > MAX_MESSAGE:
            raise WebSocketClosed("frame too large")
        mask = await self._reader.readexactly(4) if b1 & 0x80 else None
        payload = await self._reader.readexactly(n) if n else b""
        if mask is not None:
            payload = _unmask(mask, payload)
        return fin, opcode, payload

    async def receive(self) -> tuple[int, bytes] | None:
        """The next data message as (OP_TEXT|OP_BINARY, payload); None once closed.

        Control frames are handled here: Ping is answered, Pong ignored, Close echoed.
        """
        if self.ended.is_set():
            return None
        parts: list[bytes] = []
        msg_op = 0
        size = 0
        self._reading = True
        try:
            while True:
                fin, opcode, payload = await self._read_frame()
                if opcode == OP_PING:
                    if not self._pongs.allow(self.transport.get_write_buffer_size()):
                        # A graceful close would wait for the peer to read: cut it.
                        log.warning("WebSocket peer pings without reading; dropping it")
                        self.transport.abort()
                        raise WebSocketClosed("ping flood")
                    self._send(OP_PONG, payload)
                    continue
                if opcode == OP_PONG:
                    continue
                if opcode == OP_CLOSE:
                    self.close_code = (
                        struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    )
                    if not self.close_sent:
                        self.close_sent = True
                        self._send(OP_CLOSE, payload[:2])
                    break
                if opcode == OP_CONT:
                    if not msg_op:
                        raise WebSocketClosed("continuation without a message")
                elif opcode in (OP_TEXT, OP_BINARY):
                    if msg_op:
                        raise WebSocketClosed("new message inside a fragmented one")
                    msg_op = opcode
                else:
                    raise WebSocketClosed(f"unknown opcode {opcode}")
                parts.append(payload)
                size += len(payload)
                if size > MAX_MESSAGE:
                    raise WebSocketClosed("message too large")
                if fin:
                    if self.on_activity is not None:
                        self.on_activity()
                    return msg_op, b"".join(parts)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, WebSocketClosed):
            pass
        finally:
            self._reading = False
        self.ended.set()
        return None

    def _send(self, opcode: int, payload: bytes) -> None:
        if self._writer.is_closing():
            return
        self._writer.write(encode_frame(opcode, payload))

    def send_binary(self, payload: bytes) -> None:
        if not self.close_sent:
            self._send(OP_BINARY, payload)
            if self.on_activity is not None:
                self.on_activity()

    def send_text(self, payload: bytes) -> None:
        if not self.close_sent:
            self._send(OP_TEXT, payload)
            if self.on_activity is not None:
                self.on_activity()

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.drain()

    def is_closing(self) -> bool:
        return self.close_sent or self._writer.is_closing()

    async def close(self, code: int = CLOSE_NORMAL, wait: float = 2.0) -> None:
        """Send Close (once) and wait briefly for the client's echo, discarding data."""
        try:
            async with asyncio.timeout(wait):
                if not self.close_sent:
                    self.close_sent = True
                    self._send(OP_CLOSE, struct.pack("!H", code))
                    await self.drain()  # bounded: a peer that never reads must not hold us
                # Exactly one task may read: if a reader task is running, it sees the echo.
                if self.owned or self._reading:
                    await self.ended.wait()
                else:
                    while await self.receive() is not None:
                        pass
        except TimeoutError:
            pass
