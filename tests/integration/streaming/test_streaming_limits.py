"""What a hostile or broken peer can make the streaming server hold, through the real
server: connection slots, slow request heads, unexpected streams, ping floods,
port-forward pairs, idle connections (docs/streaming.md, "Limits")."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from streaming_support import EchoServer, Stack

from tests.support.spdy_client import (
    ClientStream,
    SpdyClient,
    forward_one,
    http_request,
    open_raw,
    ping_frame,
    spdy_exec,
    upgrade_head,
)

pytestmark = pytest.mark.integration

MakeStack = Callable[..., Awaitable[Stack]]
REFUSED_STREAM = 3
FLOW_CONTROL_ERROR = 7


def rss() -> int:
    """This process's resident bytes: the server runs in it, so its buffers count here."""
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything until the server closes (fails if it does not within ``timeout``)."""
    out = b""
    async with asyncio.timeout(timeout):
        try:
            while chunk := await reader.read(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out


@pytest.mark.timeout(60)
async def test_connection_caps_total_and_per_peer(stack_with: MakeStack) -> None:
    st = await stack_with(max_connections=3, max_connections_per_peer=2)
    bogus = st.server.base_url + "/exec/AAAAAAAA"
    held = [await open_raw(bogus) for _ in range(2)]  # two idle peers from 127.0.0.1
    await eventually(lambda: st.server.limiter.active == 2)

    resp, _r, w = await http_request(bogus, "GET", [])  # a third from the same address
    w.close()
    assert resp.status == 429 and resp.get("Retry-After") == "1", resp
    other = await open_raw(bogus, local_host="127.0.0.2")  # another peer: a slot is left
    await eventually(lambda: st.server.limiter.active == 3)
    r2, w2 = await open_raw(bogus, local_host="127.0.0.2")
    w2.write(b"GET /exec/AAAAAAAA HTTP/1.1\r\n\r\n")
    assert (await read_all(r2)).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    w2.close()

    # The held connections were never disturbed: each is still served.
    reader, writer = held.pop()
    writer.write(b"GET /exec/AAAAAAAA HTTP/1.1\r\n\r\n")
    assert (await read_all(reader)).startswith(b"HTTP/1.1 404 Not Found\r\n")
    writer.close()
    await eventually(lambda: st.server.limiter.active == 2)
    # One closed, so 127.0.0.1 may connect again: a whole exec goes through.
    r = await spdy_exec(st.service.exec_url("c1", ["echo", "in"]))
    assert r.stdout == b"in\n" and r.status["status"] == "Success"
    for _, w in [*held, other]:
        w.close()
    await eventually(lambda: st.server.limiter.active == 0)


@pytest.mark.timeout(60)
async def test_slow_or_huge_request_head_is_dropped(stack_with: MakeStack) -> None:
    st = await stack_with(header_timeout_seconds=1)
    url = st.server.base_url + "/exec/AAAAAAAA"
    reader, writer = await open_raw(url)
    writer.write(b"GET /exec/AAAA HT")  # half a request line, then nothing
    got = await read_all(reader, timeout=5)  # the deadline is 1 s
    assert got.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), got
    writer.close()
    silent_reader, silent = await open_raw(url)  # not even a byte
    assert (await read_all(silent_reader, timeout=5)).startswith(b"HTTP/1.1 408 ")
    silent.close()

    reader, writer = await open_raw(url)
    writer.write(b"GET /exec/AAAA HTTP/1.1\r\nX-Big: " + b"a" * (70 * 1024))
    got = await read_all(reader)
    assert got.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), got[:80]
    writer.close()
    await eventually(lambda: st.server.limiter.active == 0)


@pytest.mark.timeout(60)
async def test_unexpected_streams_are_refused_not_buffered(stack: Stack) -> None:
    url = stack.service.exec_url("c1", ["sh", "-c", "read x; echo got $x"], stdin=True)
    _resp, c = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    assert c is not None
    blob = os.urandom(1 << 20)
    before = rss()
    for i in range(64):  # 64 MiB at streams nobody asked for
        junk = await c.open_stream({"streamtype": f"junk{i}"})
        assert junk.reset == REFUSED_STREAM
        await c.write(junk, blob)
    err = await c.open_stream({"streamtype": "error"})
    assert err.reset is None
    again = await c.open_stream({"streamtype": "error"})  # a second one of a kind
    assert again.reset == REFUSED_STREAM
    sin = await c.open_stream({"streamtype": "stdin"})
    out = await c.open_stream({"streamtype": "stdout"})
    serr = await c.open_stream({"streamtype": "stderr"})
    for _ in range(16):  # 16 MiB on output streams, which only the server writes to
        await c.write(out, blob)
        await c.write(serr, blob)
    grown = rss() - before
    assert grown < 24 << 20, f"RSS grew {grown >> 20} MiB"
    await c.write(sin, b"hi\n", fin=True)
    assert await c.read_stream(out) == b"got hi\n"
    assert json.loads(await c.read_stream(err))["status"] == "Success"
    await c.close()


@pytest.mark.timeout(60)
async def test_portforward_streams_nobody_reads_are_bounded(stack: Stack) -> None:
    url = stack.service.port_forward_url("sb1")
    _resp, c = await SpdyClient.connect(url, ["portforward.k8s.io"])
    assert c is not None
    blob = os.urandom(1 << 20)
    before = rss()
    errs: list[ClientStream] = []
    for rid in range(48):  # error streams: the client never writes to them; 48 MiB anyway
        errs.append(
            await c.open_stream({"streamtype": "error", "port": "9", "requestid": f"{rid}"})
        )
        await c.write(errs[-1], blob)
    # A data stream whose error stream never comes: 64 KiB waits for it, then it is reset.
    lone = await c.open_stream({"streamtype": "data", "port": "9", "requestid": "lone"})
    await c.write(lone, blob)
    await asyncio.wait_for(lone.fin.wait(), 5)
    assert lone.reset == FLOW_CONTROL_ERROR
    grown = rss() - before
    assert grown < 24 << 20, f"RSS grew {grown >> 20} MiB"
    assert all(e.reset is None for e in errs)
    await c.close()


@pytest.mark.timeout(120)
async def test_ping_flood_from_a_peer_that_does_not_read_is_dropped(stack: Stack) -> None:
    url = stack.service.port_forward_url("sb1")
    reader, writer = await open_raw(url, rcvbuf=4096)
    writer.write(upgrade_head(url, ["portforward.k8s.io"]))
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    batch = b"".join(ping_frame(2 * i + 1) for i in range(8192))  # 96 KiB of pings
    before = rss()
    sent = 0
    dropped = False
    while sent < 48 << 20:  # without a bound, 48 MiB of pings queue 48 MiB of pongs
        try:
            writer.write(batch)
            await asyncio.wait_for(writer.drain(), 30)
        except (ConnectionError, OSError):
            dropped = True
            break
        sent += len(batch)
    grown = rss() - before
    writer.transport.abort()
    assert dropped, f"still connected after {sent >> 20} MiB of pings, never read"
    assert grown < 32 << 20, f"RSS grew {grown >> 20} MiB"
    await eventually(lambda: stack.server.limiter.active == 0)


async def open_pair(c: SpdyClient, port: int, rid: int) -> tuple[ClientStream, ClientStream]:
    headers = {"port": str(port), "requestid": str(rid)}
    err = await c.open_stream({"streamtype": "error", **headers})
    if err.reset is not None:
        return err, err
    await c.write(err, b"", fin=True)
    data = await c.open_stream({"streamtype": "data", **headers})
    return err, data


@pytest.mark.timeout(60)
async def test_portforward_pairs_beyond_the_cap_are_refused(
    stack_with: MakeStack, echo_server: EchoServer
) -> None:
    st = await stack_with(max_port_forward_pairs=2)
    _resp, c = await SpdyClient.connect(st.service.port_forward_url("sb1"), ["portforward.k8s.io"])
    assert c is not None
    open_pairs = []
    for rid in range(2):  # two forwarded connections, kept open
        err, data = await open_pair(c, echo_server.port, rid)
        await c.write(data, b"ping")
        await asyncio.wait_for(data.got_data.wait(), 5)
        open_pairs.append((err, data))
    err3, _ = await open_pair(c, echo_server.port, 2)
    assert err3.reset == REFUSED_STREAM  # the third is refused...
    err, data = open_pairs[0]
    await c.write(data, b"", fin=True)  # ...until one ends
    assert await c.read_stream(data) == b"ping"
    await c.read_stream(err)

    async def forwards_again() -> bytes:
        while True:  # the slot frees as the server finishes the pair
            try:
                return await forward_one(c, echo_server.port, 3 + len(c.streams), b"again")
            except AssertionError:
                await asyncio.sleep(0.05)

    assert await asyncio.wait_for(forwards_again(), 5) == b"again"
    await c.close()

    # The legacy WebSocket form dials every listed port: as many as pairs, no more.
    url = st.service.port_forward_url("sb1", [echo_server.port] * 3)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await session.ws_connect(url, protocols=["v4.channel.k8s.io"])
    assert e.value.status == 400


@pytest.mark.timeout(60)
async def test_streams_beyond_the_cap_are_refused(stack_with: MakeStack) -> None:
    st = await stack_with(max_streams_per_connection=5)
    _resp, c = await SpdyClient.connect(st.service.port_forward_url("sb1"), ["portforward.k8s.io"])
    assert c is not None
    streams = [
        await c.open_stream({"streamtype": "error", "port": "9", "requestid": str(rid)})
        for rid in range(6)
    ]
    assert [s.reset for s in streams] == [None] * 5 + [REFUSED_STREAM]
    await c.close()


@pytest.mark.timeout(60)
async def test_idle_connections_are_closed_and_busy_ones_are_not(stack_with: MakeStack) -> None:
    st = await stack_with(idle_timeout_seconds=1)
    # A client that only pings moves no stream data: closed, with GOAWAY.
    _resp, c = await SpdyClient.connect(st.service.port_forward_url("sb1"), ["portforward.k8s.io"])
    assert c is not None

    async def keep_pinging(client: SpdyClient) -> None:
        pid = 1
        while not client.closed.is_set():
            await client.ping(pid)
            pid += 2
            await asyncio.sleep(0.2)

    pinger = asyncio.create_task(keep_pinging(c))
    await asyncio.wait_for(c.closed.wait(), 5)  # the idle timeout is 1 s
    assert c.goaway is not None and len(c.pongs) >= 1
    pinger.cancel()
    await c.close()

    # Stream data every 0.1 s keeps an exec alive well past 1 s, in either direction:
    # input only (the command prints at the end) ...
    cmd = ["sh", "-c", "wc -c"]
    url = st.service.exec_url("c1", cmd, stdin=True, stderr=False)
    _resp, c = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    assert c is not None
    err = await c.open_stream({"streamtype": "error"})
    sin = await c.open_stream({"streamtype": "stdin"})
    out = await c.open_stream({"streamtype": "stdout"})
    for _ in range(25):
        await c.write(sin, b"x")
        await asyncio.sleep(0.1)
    await c.write(sin, b"", fin=True)
    assert (await c.read_stream(out)).strip() == b"25"
    assert json.loads(await c.read_stream(err))["status"] == "Success"
    await c.close()
    # ... and output only.
    cmd = ["sh", "-c", "for i in $(seq 25); do echo $i; sleep 0.1; done"]
    r = await spdy_exec(st.service.exec_url("c1", cmd), protocols=["v4.channel.k8s.io"])
    assert r.stdout.split() == [str(i).encode() for i in range(1, 26)]
    assert r.status["status"] == "Success"

    # WebSocket: a quiet exec is closed with 1001 (going away).
    url = st.service.exec_url("c1", ["sleep", "60"])
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=["v5.channel.k8s.io"]) as ws,
        asyncio.timeout(5),
    ):
        async for _msg in ws:
            pass
        assert ws.close_code == 1001
    await eventually(lambda: st.server.limiter.active == 0)


@pytest.mark.timeout(60)
async def test_a_peer_that_stops_reading_is_closed_when_idle(stack_with: MakeStack) -> None:
    st = await stack_with(idle_timeout_seconds=1)
    url = st.service.exec_url("c1", ["cat", "/dev/zero"], stderr=False)
    _resp, c = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    assert c is not None
    await c.open_stream({"streamtype": "error"})
    out = await c.open_stream({"streamtype": "stdout"})
    await asyncio.wait_for(out.got_data.wait(), 5)
    assert c._task is not None
    c._task.cancel()  # from now on nobody reads: the server's writes stall
    await eventually(lambda: st.server.limiter.active == 0, timeout=20)
    c.writer.transport.abort()


@pytest.mark.timeout(60)
async def test_websocket_input_is_bounded_in_bytes(stack: Stack) -> None:
    blob = b"\x04" + os.urandom(1 << 20)  # 1 MiB messages on the resize channel
    url = stack.service.exec_url("c1", ["sh", "-c", "read x; echo got $x"], stdin=True)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=["v5.channel.k8s.io"]) as ws,
    ):
        before = rss()
        for _ in range(32):  # no terminal: nobody reads channel 4, so it is dropped
            await asyncio.wait_for(ws.send_bytes(blob), 10)
        grown = rss() - before
        assert grown < 24 << 20, f"RSS grew {grown >> 20} MiB"
        await ws.send_bytes(b"\x00hi\n")
        got = b""
        async with asyncio.timeout(10):
            async for msg in ws:
                if msg.data[0] == 1:
                    got += msg.data[1:]
        assert got == b"got hi\n"

    # stdin to a process that never reads it: the server stops reading, memory stays flat.
    url = stack.service.exec_url("c1", ["sleep", "30"], stdin=True)
    blob = b"\x00" + blob[1:]
    quick = aiohttp.ClientWSTimeout(ws_close=1)  # the server is not reading: do not wait
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=["v5.channel.k8s.io"], timeout=quick) as ws,
    ):
        before = rss()

        async def flood() -> None:
            for _ in range(32):
                await ws.send_bytes(blob)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(flood(), 5)
        grown = rss() - before
        assert grown < 24 << 20, f"RSS grew {grown >> 20} MiB"
