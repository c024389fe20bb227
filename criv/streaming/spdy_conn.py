"""The server side of one SPDY/3 connection: client streams, pings, teardown.

Transport-agnostic: bytes come from a :class:`ByteSource` and go to a :class:`FrameSink`,
so the same code serves SPDY over a plain (or TLS) socket and SPDY tunnelled through
WebSocket messages (``SPDY/3.1+portforward.k8s.io``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from criv.streaming import spdy

log = logging.getLogger("criv.streaming.spdy")

# Incoming DATA is buffered per stream up to this much before the reader stops reading
# the connection. spdystream has no flow control, so TCP backpressure is all there is.
STREAM_BUFFER_LIMIT = 4 * 1024 * 1024
# The kubelet's --streaming-connection-idle-timeout default; live clients ping every 5 s.
IDLE_TIMEOUT = 4 * 3600.0


class ByteSource(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


class FrameSink(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def is_closing(self) -> bool: ...


class SpdyStream:
    """One client-opened stream: two half-streams, either of which may end first."""

    def __init__(self, conn: SpdyConnection, stream_id: int, headers: dict[str, str]) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self.replied = False
        self.local_fin = False  # we sent FIN
        self.remote_fin = False  # the client sent FIN (or reset, or went away)
        self.was_reset = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._readable = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    @property
    def type(self) -> str:
        return self.headers.get("streamtype", "")

    async def read(self) -> bytes:
        """The next chunk the client sent; b"" once its half is closed or reset."""
        while not self._chunks:
            if self.remote_fin:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._buffered <= STREAM_BUFFER_LIMIT:
            self._space.set()
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data`` in 32 KiB frames; silently dropped once the stream is done."""
        for i in range(0, len(data), spdy.DATA_CHUNK):
            if self.local_fin or self.was_reset or self.conn.closed:
                return
            self.conn.send(spdy.encode_data(self.id, data[i : i + spdy.DATA_CHUNK]))
            await self.conn.drain()

    async def close(self) -> None:
        """Half-close our side (empty DATA with FIN), once."""
        if self.local_fin or self.was_reset or self.conn.closed:
            return
        self.local_fin = True
        self.conn.send(spdy.encode_data(self.id, b"", fin=True))
        await self.conn.drain()

    def reset(self, status: int = spdy.CANCEL) -> None:
        """Kill both halves; the RST goes out only if the stream was still open."""
        if self.was_reset:
            return
        self.was_reset = True
        if not self.conn.closed and not (self.local_fin and self.remote_fin):
            self.conn.send(spdy.encode_rst(self.id, status))
        self._end_remote()

    # --- called by the connection's reader ---

    async def _feed(self, data: bytes, fin: bool) -> None:
        if self.was_reset or self.remote_fin:
            return
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            self._readable.set()
        if fin:
            self._end_remote()
        elif self._buffered > STREAM_BUFFER_LIMIT:
            self._space.clear()
            await self._space.wait()

    def _end_remote(self) -> None:
        self.remote_fin = True
        self._readable.set()
        self._space.set()

    def _peer_reset(self) -> None:
        self.was_reset = True
        self._end_remote()


StreamHandler = Callable[[SpdyStream], None]


class SpdyConnection:
    """Reads frames and dispatches them; ``on_stream`` accepts or rejects each new stream.

    ``on_stream`` runs synchronously in the reader and must call :meth:`reply` or
    :meth:`reject`: the client opens its streams one at a time, waiting for each reply.
    """

    def __init__(self, source: ByteSource, sink: FrameSink, on_stream: StreamHandler) -> None:
        self._source = source
        self._sink = sink
        self._on_stream = on_stream
        self._compressor = spdy.HeaderCompressor()
        self._decompressor = spdy.HeaderDecompressor()
        self.streams: dict[int, SpdyStream] = {}
        self.last_stream_id = 0
        self.closed = False  # we sent GOAWAY or the transport is gone
        self.goaway_received = asyncio.Event()
        self.done = asyncio.Event()  # the reader stopped: client EOF, GOAWAY or error

    def send(self, frame: bytes) -> None:
        if self.closed or self._sink.is_closing():
            return
        self._sink.write(frame)

    async def drain(self) -> None:
        try:
            await self._sink.drain()
        except (ConnectionError, OSError):
            self._transport_lost()

    def reply(self, stream: SpdyStream) -> None:
        stream.replied = True
        self.send(spdy.encode_syn_reply(self._compressor, stream.id, {}))

    def reject(self, stream: SpdyStream, status: int = spdy.CANCEL) -> None:
        stream.reset(status)
        self.streams.pop(stream.id, None)

    async def run(self) -> None:
        """The reader loop; returns when the client is gone or has sent GOAWAY."""
        try:
            async with asyncio.timeout(IDLE_TIMEOUT) as idle:
                await self._read_frames(idle)
        except TimeoutError:
            log.info("SPDY connection idle for %.0f s; closing", IDLE_TIMEOUT)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            # The client is gone: nothing we write would arrive (and asyncio would log
            # every failed send), so teardown writes nothing more.
            self._transport_lost()
        except spdy.SpdyProtocolError as e:
            log.warning("SPDY protocol error from client, closing: %s", e)
            self.send(spdy.encode_goaway(self.last_stream_id, 1))
            self.closed = True
        finally:
            for s in self.streams.values():
                s._end_remote()
            self.done.set()

    async def _read_frames(self, idle: asyncio.Timeout) -> None:
        loop = asyncio.get_running_loop()
        while True:
            header = await self._source.readexactly(8)
            # Any frame (client pings included) proves the connection alive.
            idle.reschedule(loop.time() + IDLE_TIMEOUT)
            is_control, kind, flags, length = spdy.parse_frame_header(header)
            payload = await self._source.readexactly(length) if length else b""
            if is_control:
                self._control(kind, flags, payload)
                if kind == spdy.GOAWAY:
                    return
            else:
                await self._data(kind, flags, payload)

    def _control(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == spdy.SYN_STREAM:
            sid, _assoc, block = spdy.parse_syn_stream(payload)
            headers = self._decompressor.decompress(block)  # always, to stay in step
            self._new_stream(sid, headers, bool(flags & spdy.FLAG_FIN))
        elif kind in (spdy.SYN_REPLY, spdy.HEADERS):
            _sid, block = spdy.parse_stream_id_block(payload)
            self._decompressor.decompress(block)
        elif kind == spdy.RST_STREAM:
            sid, _status = spdy.parse_two_words(payload, "RST_STREAM")
            stream = self.streams.pop(sid, None)
            if stream is not None:
                stream._peer_reset()
        elif kind == spdy.PING:
            ping_id = spdy.parse_ping(payload)
            if ping_id % 2 == 1:  # the client's (odd) ping: echo it unchanged
                self.send(spdy.encode_ping(ping_id))
        elif kind == spdy.GOAWAY:
            spdy.parse_two_words(payload, "GOAWAY")
            self.goaway_received.set()
        # SETTINGS, WINDOW_UPDATE and anything unknown: ignored (no flow control).

    def _new_stream(self, sid: int, headers: dict[str, str], fin: bool) -> None:
        if sid == 0:
            # An RST for stream 0 would itself kill a Go peer: treat it as fatal.
            raise spdy.SpdyProtocolError("SYN_STREAM for stream 0")
        if sid % 2 == 0 or sid <= self.last_stream_id:
            self.send(spdy.encode_rst(sid, spdy.PROTOCOL_ERROR))
            return
        self.last_stream_id = sid
        stream = SpdyStream(self, sid, headers)
        self.streams[sid] = stream
        if fin:
            stream._end_remote()
        self._on_stream(stream)

    async def _data(self, sid: int, flags: int, data: bytes) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return  # unknown or already reset stream
        await stream._feed(data, bool(flags & spdy.FLAG_FIN))

    def _transport_lost(self) -> None:
        self.closed = True
        for s in self.streams.values():
            s._end_remote()

    async def shutdown(self) -> None:
        """RST what we have not finished, then GOAWAY; the caller closes the transport."""
        if self.closed:
            return
        for stream in list(self.streams.values()):
            if stream.replied and not stream.local_fin and not stream.was_reset:
                stream.reset(spdy.CANCEL)
        self.send(spdy.encode_goaway(self.last_stream_id, spdy.GOAWAY_OK))
        self.closed = True
        with contextlib.suppress(ConnectionError, OSError):
            await self._sink.drain()
