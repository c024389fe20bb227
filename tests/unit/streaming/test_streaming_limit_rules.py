"""The streaming limits as pure logic: connection slots, the pong guard, the idle watch,
the request-head reader, upgrade refusals, the config keys, and the SPDY connection's
buffered-bytes rules driven with in-memory frames."""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import pytest

from criv.config import ConfigError, StreamingConfig
from criv.streaming import spdy
from criv.streaming.http import MAX_HEADER_BYTES, BadRequest, parse_request, read_request
from criv.streaming.limits import (
    ConnectionLimiter,
    IdleWatch,
    PongGuard,
    QuietLog,
    SpdyLimits,
)
from criv.streaming.negotiate import Upgrade, websocket_upgrade
from criv.streaming.requests import ExecRequest, PortForwardRequest
from criv.streaming.spdy_conn import SpdyConnection, SpdyStream


def test_connection_limiter_total_and_per_peer() -> None:
    lim = ConnectionLimiter(total=3, per_peer=2)
    assert lim.acquire("a") is None and lim.acquire("a") is None
    refusal = lim.acquire("a")
    assert refusal is not None and refusal.status == 429
    assert lim.acquire("b") is None
    refusal = lim.acquire("c")
    assert refusal is not None and refusal.status == 503
    assert lim.active == 3
    lim.release("a")
    assert lim.acquire("c") is None  # a freed slot serves anyone
    for peer in ("a", "b", "c"):
        lim.release(peer)
    assert lim.active == 0 and lim.held_by("a") == 0
    lim.release("never-seen")  # a stray release does not go negative
    assert lim.active == 0


def test_pong_guard_counts_only_pongs_behind_unsent_bytes() -> None:
    guard = PongGuard(limit=3)
    assert all(guard.allow(100) for _ in range(3))
    assert guard.allow(0)  # the peer read everything: the count starts again
    assert all(guard.allow(100) for _ in range(3))
    assert not guard.allow(100)


async def test_idle_watch_fires_once_after_quiet_and_never_when_off() -> None:
    fired: list[int] = []
    watch = IdleWatch(0.2, lambda: fired.append(1))
    off = IdleWatch(0, lambda: fired.append(2))
    loop = asyncio.get_running_loop()
    watch.last = loop.time() + 100  # as if touched in the future: the check re-arms
    watch._check()
    assert not watch.fired and fired == []
    watch.touch()
    async with asyncio.timeout(5):
        while not watch.fired:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert fired == [1]  # once, and the disabled watch never
    watch.cancel()
    off.cancel()


def test_quiet_log_keeps_a_flood_out_of_the_log(caplog: pytest.LogCaptureFixture) -> None:
    q = QuietLog(logging.getLogger("test.quiet"), interval=3600)
    with caplog.at_level(logging.WARNING, logger="test.quiet"):
        for i in range(100):
            q.warning("refused %d", i)
    assert [r.getMessage() for r in caplog.records] == ["refused 0"]


async def _reader_with(data: bytes, eof: bool, limit: int = MAX_HEADER_BYTES) -> Any:
    r = asyncio.StreamReader(limit=limit)
    r.feed_data(data)
    if eof:
        r.feed_eof()
    return r


async def test_read_request_deadline_size_and_garbage() -> None:
    ok = await _reader_with(b"GET /exec/x?a=1 HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", False)
    req = await read_request(ok, 1)
    assert req is not None and (req.path, req.query, req.get("upgrade")) == (
        "/exec/x",
        "a=1",
        "websocket",
    )
    for data, eof, status in (
        (b"GET /exec/x HT", False, 408),  # half a request line, then silence
        (b"X" * 200, False, 431),  # past the limit without an end of headers
        (b"NONSENSE\r\n\r\n", False, 400),
    ):
        with pytest.raises(BadRequest) as e:
            await read_request(await _reader_with(data, eof, limit=100), 0.2)
        assert e.value.status == status
    assert await read_request(await _reader_with(b"GET /", True), 1) is None  # peer left


def test_parse_request_rejects_header_without_colon() -> None:
    with pytest.raises(ValueError):
        parse_request(b"GET / HTTP/1.1\r\nbroken\r\n\r\n")


def _ws_req(protocol: str) -> Any:
    raw = (
        "GET /portforward/x HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5YQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
    )
    return parse_request(raw.encode())


def test_legacy_websocket_portforward_port_count_is_capped() -> None:
    many = PortForwardRequest("sb", [80, 81, 82])
    refused = websocket_upgrade(_ws_req("v4.channel.k8s.io"), many, max_ports=2)
    assert isinstance(refused, bytes) and refused.startswith(b"HTTP/1.1 400 ")
    ok = websocket_upgrade(_ws_req("v4.channel.k8s.io"), many, max_ports=3)
    assert isinstance(ok, Upgrade) and ok.protocol == "v4.channel.k8s.io"
    # The tunnel carries ports per stream, not in the request: not this cap's business.
    tunnel = websocket_upgrade(_ws_req("SPDY/3.1+portforward.k8s.io"), many, max_ports=1)
    assert isinstance(tunnel, Upgrade)
    assert isinstance(
        websocket_upgrade(_ws_req("v5.channel.k8s.io"), ExecRequest("c", ["x"]), 1), Upgrade
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_connections", 0),
        ("max_connections_per_peer", 0),
        ("max_connections_per_peer", 300),  # more than max_connections
        ("header_timeout_seconds", 0),
        ("header_timeout_seconds", 301),
        ("idle_timeout_seconds", -1),
        ("max_streams_per_connection", 4),
        ("max_port_forward_pairs", 0),
        ("stream_buffer_kib", 63),
        ("connection_buffer_kib", 512),  # less than stream_buffer_kib
    ],
)
def test_streaming_limit_keys_are_validated(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"streaming.{key}"):
        StreamingConfig(**{key: value}).validate("streaming")


def test_streaming_limit_defaults_are_valid_and_reach_spdy_limits() -> None:
    cfg = StreamingConfig()
    cfg.validate("streaming")
    assert (cfg.max_connections, cfg.max_connections_per_peer) == (256, 64)
    assert cfg.idle_timeout_seconds == 4 * 3600 and cfg.header_timeout_seconds == 10
    lim = SpdyLimits.from_config(StreamingConfig(stream_buffer_kib=64, connection_buffer_kib=128))
    assert (lim.stream_buffer, lim.connection_buffer, lim.pending_buffer) == (
        64 << 10,
        128 << 10,
        64 << 10,
    )


# --- the SPDY connection's buffering rules, with frames fed from memory ---


class _Transport:
    def __init__(self) -> None:
        self.unsent = 0
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def abort(self) -> None:
        self.aborted = True


class _Sink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.transport = _Transport()

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    async def drain(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def rsts(self) -> list[tuple[int, int]]:
        out = []
        for f in self.frames:
            if f[:4] == b"\x80\x03\x00\x03":
                a, b = struct.unpack("!II", f[8:16])
                out.append((a, b))
        return out


class _Client:
    """Feeds client frames into a connection under test."""

    def __init__(self, limits: SpdyLimits, on_stream: Any) -> None:
        self.source = asyncio.StreamReader(limit=1 << 26)
        self.sink = _Sink()
        self.comp = spdy.HeaderCompressor()
        self.conn = SpdyConnection(self.source, self.sink, on_stream, limits)  # type: ignore[arg-type]
        self.task = asyncio.create_task(self.conn.run())

    def syn(self, sid: int, **headers: str) -> None:
        self.source.feed_data(spdy.encode_syn_stream(self.comp, sid, headers))

    def data(self, sid: int, payload: bytes, fin: bool = False) -> None:
        self.source.feed_data(spdy.encode_data(sid, payload, fin))

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def close(self) -> None:
        self.source.feed_eof()
        await asyncio.wait_for(self.task, 5)


LIMITS = SpdyLimits(max_streams=4, stream_buffer=64 << 10, connection_buffer=96 << 10)


async def test_pending_stream_is_reset_past_its_buffer_and_discarded_input_is_dropped() -> None:
    def on_stream(s: SpdyStream) -> None:
        c.conn.reply(s)
        if s.type == "error":
            s.ignore_input()

    c = _Client(LIMITS, on_stream)
    c.syn(1, streamtype="error")
    c.syn(3, streamtype="data")  # nobody wants it yet
    for _ in range(8):
        c.data(1, b"e" * 32768)  # 256 KiB nobody will read: dropped
    c.data(3, b"d" * 32768)
    c.data(3, b"d" * 32768)  # 64 KiB: still held
    await c.settle()
    assert c.sink.rsts() == [] and c.conn.buffered == 64 << 10
    c.data(3, b"d")  # one byte more: reset, and its bytes are released
    await c.settle()
    assert c.sink.rsts() == [(3, spdy.FLOW_CONTROL_ERROR)]
    assert c.conn.buffered == 0 and 3 not in c.conn.streams
    await c.close()


async def test_read_streams_pause_the_reader_until_read() -> None:
    streams: list[SpdyStream] = []

    def on_stream(s: SpdyStream) -> None:
        c.conn.reply(s)
        s.want()
        streams.append(s)

    c = _Client(LIMITS, on_stream)
    c.syn(1, streamtype="stdin")
    for _ in range(6):
        c.data(1, b"x" * 32768)  # 192 KiB against a 64 KiB stream buffer
    c.syn(3, streamtype="late")  # behind the data: not read while paused
    await c.settle()
    assert len(streams) == 1 and c.conn.buffered <= (64 << 10) + 32768
    got = 0
    while got < 6 * 32768:
        got += len(await asyncio.wait_for(streams[0].read(), 5))
    await c.settle()
    assert len(streams) == 2  # reading made room and the reader went on
    await c.close()


async def test_streams_beyond_the_cap_are_refused_and_finished_ones_leave() -> None:
    def on_stream(s: SpdyStream) -> None:
        c.conn.reply(s)

    c = _Client(LIMITS, on_stream)
    for sid in (1, 3, 5, 7, 9):
        c.syn(sid, streamtype="x")
    await c.settle()
    assert c.sink.rsts() == [(9, spdy.REFUSED_STREAM)]
    c.data(1, b"", fin=True)
    await c.settle()
    await c.conn.streams[1].close()  # both halves done: the slot is free again
    c.syn(11, streamtype="x")
    await c.settle()
    assert 1 not in c.conn.streams and 11 in c.conn.streams
    await c.close()


async def test_pings_behind_unsent_bytes_drop_the_peer() -> None:
    c = _Client(SpdyLimits(max_queued_pongs=3), lambda s: None)
    c.sink.transport.unsent = 1000  # the peer reads nothing
    for pid in (1, 3, 5):
        c.source.feed_data(spdy.encode_ping(pid))
    await c.settle()
    assert not c.task.done() and len(c.sink.frames) == 3
    c.source.feed_data(spdy.encode_ping(7))
    await asyncio.wait_for(c.task, 5)
    assert c.sink.transport.aborted and len(c.sink.frames) == 3
