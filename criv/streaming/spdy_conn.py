"""The server side of one SPDY/3 connection: client streams, pings, teardown.

Transport-agnostic: bytes come from a :class:`ByteSource` and go to a :class:`FrameSink`,
so the same code serves SPDY over a plain (or TLS) socket and SPDY tunnelled through
WebSocket messages (``SPDY/3.1+portforward.k8s.io``).

spdystream has no flow control, so what the client sends is bounded here: a stream
someone reads pauses the reader past its buffer (TCP backpressure), a stream nobody reads
yet is reset past a small one, a stream nobody will read drops its data, and streams,
frames and queued pongs are capped (:class:`~criv.streaming.limits.SpdyLimits`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
from collections.abc import Callable
from typing import Protocol

from criv.streaming import spdy
from criv.streaming.limits import PongGuard, SpdyLimits

log = logging.getLogger("criv.streaming.spdy")

# Data frames are read in pieces of this size, so a 16 MiB frame (legal) never sits in
# memory whole; control frames are tiny in every k8s protocol.
READ_PIECE = 64 * 1024
MAX_CONTROL_FRAME = 1024 * 1024
SHUTDOWN_DRAIN_SECONDS = 3.0


class ByteSource(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


class FrameSink(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def is_closing(self) -> bool: ...

    @property
    def transport(self) -> asyncio.WriteTransport: ...


class PeerNotReading(Exception):
    """The peer keeps sending pings but does not read the pongs."""


class Input(enum.Enum):
    PENDING = "pending"  # nobody reads it yet: a small buffer, reset beyond it
    READ = "read"  # someone reads it: buffered, the connection pauses beyond the limit
    DISCARD = "discard"  # nobody ever reads it (output and error streams): dropped


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
        self.input = Input.PENDING
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._readable = asyncio.Event()

    @property
    def type(self) -> str:
        return self.headers.get("streamtype", "")

    def want(self) -> None:
        """Someone will read this stream: buffer its data with backpressure."""
        self.input = Input.READ

    def ignore_input(self) -> None:
        """Nobody reads this stream: drop what the client sends on it."""
        self.input = Input.DISCARD
        self._drop_buffer()

    async def read(self) -> bytes:
        """The next chunk the client sent; b"" once its half is closed or reset."""
        while not self._chunks:
            if self.remote_fin:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._buffered -= len(data)
        self.conn._release(len(data))
        return data

    async def write(self, data: bytes) -> None:
        """Send ``data`` in 32 KiB frames; silently dropped once the stream is done."""
        for i in range(0, len(data), spdy.DATA_CHUNK):
            if self.local_fin or self.was_reset or self.conn.closed:
                return
            self.conn.send(spdy.encode_data(self.id, data[i : i + spdy.DATA_CHUNK]))
            self.conn.activity()
            await self.conn.drain()

    async def close(self) -> None:
        """Half-close our side (empty DATA with FIN), once."""
        if self.local_fin or self.was_reset or self.conn.closed:
            return
        self.local_fin = True
        self.conn.send(spdy.encode_data(self.id, b"", fin=True))
        self._forget_if_done()
        await self.conn.drain()

    def reset(self, status: int = spdy.CANCEL) -> None:
        """Kill both halves; the RST goes out only if the stream was still open."""
        if self.was_reset:
            return
        self.was_reset = True
        if not self.conn.closed and not (self.local_fin and self.remote_fin):
            self.conn.send(spdy.encode_rst(self.id, status))
        self._drop_buffer()
        self._end_remote()

    # --- called by the connection's reader ---

    async def _feed(self, data: bytes, fin: bool) -> None:
        if self.was_reset or self.remote_fin:
            return
        if data and self.input is not Input.DISCARD:
            if self.input is Input.PENDING and not self.conn._room_for_pending(self, len(data)):
                self.conn.warn_once(
                    "pending", "reset stream %d: data before anyone reads it", self.id
                )
                self.conn.reject(self, spdy.FLOW_CONTROL_ERROR)
                return
            self._chunks.append(data)
            self._buffered += len(data)
            self.conn._hold(len(data))
            self._readable.set()
        if fin:
            self._end_remote()
        elif self.input is Input.READ:
            await self.conn._wait_for_room(self)

    def _drop_buffer(self) -> None:
        self.conn._release(self._buffered)
        self._chunks.clear()
        self._buffered = 0

    def _end_remote(self) -> None:
        self.remote_fin = True
        self._readable.set()
        self.conn._room.set()  # a reader paused on this stream goes on
        self._forget_if_done()

    def _forget_if_done(self) -> None:
        # A finished stream leaves the table, so a long port-forward session that carries
        # many connections one after another does not keep every stream it ever had.
        if self.was_reset or (self.local_fin and self.remote_fin):
            self.conn.streams.pop(self.id, None)

    def _peer_reset(self) -> None:
        self.was_reset = True
        self._drop_buffer()
        self._end_remote()


StreamHandler = Callable[[SpdyStream], None]


class SpdyConnection:
    """Reads frames and dispatches them; ``on_stream`` accepts or rejects each new stream.

    ``on_stream`` runs synchronously in the reader and must call :meth:`reply` or
    :meth:`reject`: the client opens its streams one at a time, waiting for each reply.
    ``on_activity`` is called whenever stream data moves either way (the idle timeout).
    """

    def __init__(
        self,
        source: ByteSource,
        sink: FrameSink,
        on_stream: StreamHandler,
        limits: SpdyLimits | None = None,
        on_activity: Callable[[], None] | None = None,
    ) -> None:
        self._source = source
        self._sink = sink
        self._on_stream = on_stream
        self.limits = limits or SpdyLimits()
        self.activity: Callable[[], None] = on_activity or (lambda: None)
        self._compressor = spdy.HeaderCompressor()
        self._decompressor = spdy.HeaderDecompressor()
        self._pongs = PongGuard(self.limits.max_queued_pongs)
        self.streams: dict[int, SpdyStream] = {}
        self.last_stream_id = 0
        self.buffered = 0  # client bytes held for all streams
        self._room = asyncio.Event()
        self._warned: set[str] = set()
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

    def warn_once(self, key: str, msg: str, *args: object) -> None:
        """One warning per kind per connection: a flood must not flood the log."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg + " (further ones on this connection not logged)", *args)

    async def run(self) -> None:
        """The reader loop; returns when the client is gone or has sent GOAWAY."""
        try:
            await self._read_frames()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            # The client is gone: nothing we write would arrive (and asyncio would log
            # every failed send), so teardown writes nothing more.
            self._transport_lost()
        except PeerNotReading:
            log.warning(
                "SPDY peer sent %d pings without reading the answers; dropping it",
                self._pongs.queued,
            )
            self._sink.transport.abort()  # a graceful close would wait for it to read
            self._transport_lost()
        except spdy.SpdyProtocolError as e:
            log.warning("SPDY protocol error from client, closing: %s", e)
            self.send(spdy.encode_goaway(self.last_stream_id, 1))
            self.closed = True
        finally:
            for s in list(self.streams.values()):
                s._end_remote()
            self._room.set()
            self.done.set()

    async def _read_frames(self) -> None:
        while True:
            header = await self._source.readexactly(8)
            is_control, kind, flags, length = spdy.parse_frame_header(header)
            if not is_control:
                await self._data_frame(kind, flags, length)
                continue
            if length > MAX_CONTROL_FRAME:
                raise spdy.SpdyProtocolError(f"control frame of {length} bytes")
            payload = await self._source.readexactly(length) if length else b""
            self._control(kind, flags, payload)
            if kind == spdy.GOAWAY:
                return

    async def _data_frame(self, sid: int, flags: int, length: int) -> None:
        fin = bool(flags & spdy.FLAG_FIN)
        if length == 0:
            await self._data(sid, b"", fin)
            return
        while length > 0:
            piece = await self._source.readexactly(min(length, READ_PIECE))
            length -= len(piece)
            await self._data(sid, piece, fin and length == 0)

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
                if not self._pongs.allow(self._sink.transport.get_write_buffer_size()):
                    raise PeerNotReading()
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
        if len(self.streams) >= self.limits.max_streams:
            self.warn_once(
                "streams",
                "refusing SPDY stream %d: %d streams open (max_streams_per_connection)",
                sid,
                len(self.streams),
            )
            self.send(spdy.encode_rst(sid, spdy.REFUSED_STREAM))
            return
        stream = SpdyStream(self, sid, headers)
        self.streams[sid] = stream
        if fin:
            stream._end_remote()
        self._on_stream(stream)

    async def _data(self, sid: int, data: bytes, fin: bool) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            return  # unknown, finished or reset stream
        self.activity()
        await stream._feed(data, fin)

    # --- the buffered-bytes budget ---

    def _hold(self, n: int) -> None:
        self.buffered += n

    def _release(self, n: int) -> None:
        if n:
            self.buffered -= n
            self._room.set()

    def _room_for_pending(self, stream: SpdyStream, n: int) -> bool:
        return (
            stream._buffered + n <= self.limits.pending_buffer
            and self.buffered + n <= self.limits.connection_buffer
        )

    async def _wait_for_room(self, stream: SpdyStream) -> None:
        """Stop reading the connection while this stream, or all together, hold too much."""
        while not (stream.remote_fin or self.done.is_set()) and (
            stream._buffered > self.limits.stream_buffer
            or self.buffered > self.limits.connection_buffer
        ):
            self._room.clear()
            await self._room.wait()

    def _transport_lost(self) -> None:
        self.closed = True
        for s in list(self.streams.values()):
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
        # Bounded: an idle-timed-out peer may be one that stopped reading long ago.
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            async with asyncio.timeout(SHUTDOWN_DRAIN_SECONDS):
                await self._sink.drain()
