"""Port-forward over SPDY (``portforward.k8s.io``), plain or tunnelled in WebSocket.

Each forwarded TCP connection is a pair of client streams (error + data) sharing a
``requestid``; one session carries any number of them, to any ports (sheet section 8.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from criv.errors import CrivError
from criv.streaming import spdy
from criv.streaming.backend import DuplexStream, StreamingBackend
from criv.streaming.requests import PortForwardRequest
from criv.streaming.spdy_conn import SpdyConnection, SpdyStream

log = logging.getLogger("criv.streaming.portforward")

PROTOCOL = "portforward.k8s.io"
PAIR_TIMEOUT = 30.0
# After the pod side closes, how long the client's direction may still run (containerd).
DRAIN_GRACE = 1.0
READ_CHUNK = 32 * 1024


@dataclass
class _Pair:
    request_id: str
    port: int
    error: SpdyStream | None = None
    data: SpdyStream | None = None
    timer: asyncio.TimerHandle | None = None
    started: bool = False
    failed: bool = False
    extra: list[SpdyStream] = field(default_factory=list)


def parse_port(value: str | None) -> int | None:
    if value is None or not value.isdigit():
        return None
    port = int(value)
    return port if 1 <= port <= 65535 else None


class SpdyPortForward:
    """Handles one SPDY port-forward connection; :meth:`on_stream` is its stream handler."""

    def __init__(
        self, backend: StreamingBackend, request: PortForwardRequest, max_pairs: int = 128
    ) -> None:
        self._backend = backend
        self._request = request
        self._max_pairs = max_pairs
        self._pairs: dict[str, _Pair] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.conn: SpdyConnection | None = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def on_stream(self, stream: SpdyStream) -> None:
        assert self.conn is not None
        port = parse_port(stream.headers.get("port"))
        kind = stream.type
        if port is None or kind not in ("data", "error"):
            self.conn.reject(stream, spdy.CANCEL)
            return
        # Old clients send no requestid: pair error stream N with data stream N+2.
        rid = stream.headers.get("requestid")
        if rid is None:
            rid = str(stream.id if kind == "error" else stream.id - 2)
        pair = self._pairs.get(rid)
        if pair is None and len(self._pairs) >= self._max_pairs:
            # client-go reports the refused stream for that one connection and goes on.
            self.conn.warn_once(
                "pairs",
                "refusing port-forward stream %d: %d connections open (max_port_forward_pairs)",
                stream.id,
                len(self._pairs),
            )
            self.conn.reject(stream, spdy.REFUSED_STREAM)
            return
        self.conn.reply(stream)
        if kind == "error":
            stream.ignore_input()  # the client only ever half-closes it
        if pair is None:
            pair = _Pair(rid, port)
            pair.timer = asyncio.get_running_loop().call_later(
                PAIR_TIMEOUT, self._pair_timed_out, rid
            )
            self._pairs[rid] = pair
        if getattr(pair, kind) is not None or pair.started:
            # A second stream of one type for one request: report it, keep the first.
            pair.extra.append(stream)
            stream.ignore_input()
            if pair.error is not None:
                msg = f"received multiple {kind} streams for request {rid}"
                self._spawn(pair.error.write(msg.encode()))
            self._spawn(stream.close())
            return
        setattr(pair, kind, stream)
        if pair.error is not None and pair.data is not None:
            if pair.timer is not None:
                pair.timer.cancel()
            pair.started = True
            pair.data.want()
            self._spawn(self._forward(pair, pair.error, pair.data))

    def _pair_timed_out(self, rid: str) -> None:
        pair = self._pairs.pop(rid, None)
        if pair is None or pair.started:
            return

        async def report(p: _Pair) -> None:
            if p.error is not None:
                await p.error.write(b"timed out waiting for streams")
                await p.error.close()
            if p.data is not None:
                p.data.reset()

        self._spawn(report(pair))

    async def _forward(self, pair: _Pair, error: SpdyStream, data: SpdyStream) -> None:
        sandbox = self._request.sandbox_id
        try:
            try:
                target = await self._backend.port_forward(sandbox, pair.port)
            except (CrivError, OSError) as e:
                cause = getattr(e, "message", None) or str(e)
                msg = f"error forwarding port {pair.port} to pod {sandbox}, uid : {cause}"
                log.info("%s", msg)
                await error.write(msg.encode())
                await error.close()
                await data.close()
                return
            try:
                await _relay(data, target)
            finally:
                await target.close()
            await data.close()
            await error.close()
        finally:
            self._pairs.pop(pair.request_id, None)

    async def run(self, conn: SpdyConnection) -> None:
        """Serve until the client sends GOAWAY or goes away; then close every target."""
        self.conn = conn
        try:
            await conn.run()
        finally:
            for pair in self._pairs.values():
                if pair.timer is not None:
                    pair.timer.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await conn.shutdown()


async def _relay(stream: SpdyStream, target: DuplexStream) -> None:
    async def up() -> None:  # client -> pod; the client's FIN half-closes toward the pod
        while data := await stream.read():
            await target.write(data)
        await target.close_write()

    async def down() -> None:  # pod -> client
        while data := await target.read(READ_CHUNK):
            await stream.write(data)
        await stream.close()

    up_task = asyncio.create_task(up())
    down_task = asyncio.create_task(down())
    try:
        # A client half-close leaves the pod's answer to arrive; the pod closing gives the
        # client's direction a short grace, as containerd does.
        await asyncio.wait({up_task, down_task}, return_when=asyncio.FIRST_COMPLETED)
        if not down_task.done():
            if not stream.was_reset:  # a FIN, not an RST: the answer may still come
                await asyncio.wait({down_task})
        elif not up_task.done():
            await asyncio.wait({up_task}, timeout=DRAIN_GRACE)
    finally:
        for t in (up_task, down_task):
            t.cancel()
        results = await asyncio.gather(up_task, down_task, return_exceptions=True)
        for r in results:
            if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError):
                with contextlib.suppress(Exception):
                    log.debug("port-forward relay ended: %s", r)
