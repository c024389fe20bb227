"""The streaming HTTP server: /exec, /attach and /portforward URLs behind single-use tokens.

A deliberately small HTTP/1.1 server on asyncio streams: every request it serves is an
upgrade (SPDY/3.1 or WebSocket) or an error, so it needs no keep-alive, no bodies and
no HTTP/2. Owning the socket lets it honour the wire rules an HTTP framework would get
in the way of: nothing may follow the SPDY 101 until the client speaks, and a session
ends with a lingering close so the client reads everything before the socket goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import ssl
from collections.abc import Awaitable, Callable

from criv.config import StreamingConfig
from criv.streaming import remotecommand, spdy
from criv.streaming.backend import StreamingBackend
from criv.streaming.http import (
    MAX_HEADER_BYTES,
    BadRequest,
    HttpRequest,
    is_websocket,
    read_request,
    text_response,
)
from criv.streaming.limits import ConnectionLimiter, IdleWatch, QuietLog, SpdyLimits
from criv.streaming.negotiate import spdy_upgrade, websocket_upgrade
from criv.streaming.portforward import SpdyPortForward
from criv.streaming.remotecommand import SessionIO, run_session
from criv.streaming.requests import AttachRequest, ExecRequest, PortForwardRequest, StreamRequest
from criv.streaming.spdy_conn import SpdyConnection, SpdyStream
from criv.streaming.tokens import TokenCache
from criv.streaming.websocket import WebSocket
from criv.streaming.wschannels import (
    TUNNEL_PORTFORWARD,
    TunnelSink,
    TunnelSource,
    serve_legacy_portforward,
    serve_remotecommand,
)

log = logging.getLogger("criv.streaming")

STREAM_CREATION_TIMEOUT = 30.0
LINGER_SECONDS = 3.0
# A refused peer gets this long to read its 429/503 before the socket goes.
REFUSAL_LINGER_SECONDS = 1.0
CLOSE_GOING_AWAY = 1001
ROUTE = re.compile(r"^/(exec|attach|portforward)/([A-Za-z0-9_-]+)$")
KIND = {"exec": ExecRequest, "attach": AttachRequest, "portforward": PortForwardRequest}
NOT_FOUND = b"404 page not found\n"

Session = Callable[[Callable[[], None]], Awaitable[None]]  # takes the idle watch's touch


def _peer_address(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "local"


class StreamingServer:
    """Serves the URLs the CRI Exec/Attach/PortForward calls hand out.

    Lifecycle: ``await start()`` binds (port 0 = ephemeral) and fixes :attr:`base_url`;
    ``await stop()`` closes the listener and every live session.
    """

    def __init__(self, config: StreamingConfig, backend: StreamingBackend) -> None:
        self.config = config
        self.backend = backend
        self.tokens = TokenCache(ttl=float(config.token_ttl_seconds))
        self.base_url = ""
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self.limiter = ConnectionLimiter(config.max_connections, config.max_connections_per_peer)
        self.spdy_limits = SpdyLimits.from_config(config)
        self._refusals = QuietLog(log)
        spdy.dictionary()  # fail at start, not on the first exec, if the data file is bad

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        ctx.set_alpn_protocols(["http/1.1"])  # an upgrade cannot happen over HTTP/2
        return ctx

    async def start(self) -> None:
        ctx = self._ssl_context()
        self._server = await asyncio.start_server(
            self._accept,
            self.config.address,
            self.config.port,
            ssl=ctx,
            limit=MAX_HEADER_BYTES,
            # the handshake happens before the request head, under the same deadline
            ssl_handshake_timeout=float(self.config.header_timeout_seconds) if ctx else None,
        )
        port = self._server.sockets[0].getsockname()[1]
        host = self.config.address
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        self.base_url = f"{'https' if ctx else 'http'}://{host}:{port}"
        log.info("streaming server listening on %s", self.base_url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def url_for(self, request: StreamRequest) -> str:
        """Cache ``request`` under a fresh token and return its absolute URL."""
        if not self.base_url:
            raise RuntimeError("streaming server is not started")
        kind = {ExecRequest: "exec", AttachRequest: "attach", PortForwardRequest: "portforward"}
        token = self.tokens.insert(request)
        return f"{self.base_url}/{kind[type(request)]}/{token}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        peer = _peer_address(writer)
        refusal = self.limiter.acquire(peer)
        try:
            if refusal is not None:
                self._refusals.warning(
                    "refused a streaming connection from %s: %s (%d open, %d from it)",
                    peer,
                    refusal.message,
                    self.limiter.active,
                    self.limiter.held_by(peer),
                )
                body = refusal.message + "\n"
                extra = [("Retry-After", "1")]
                writer.write(text_response(refusal.status, refusal.reason, body, extra))
                await _linger(reader, writer, REFUSAL_LINGER_SECONDS)
                return
            await self._handle(reader, writer, peer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # stop() cancels live sessions; end quietly, since asyncio's connection
            # callback would otherwise log the cancellation as an error.
            pass
        except Exception:
            log.exception("streaming session failed")
        finally:
            await _close(writer)
            if refusal is None:
                self.limiter.release(peer)
            self._sessions.discard(task)

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        try:
            req = await read_request(reader, float(self.config.header_timeout_seconds))
        except BadRequest as e:
            if e.status != 400:
                self._refusals.warning("streaming request from %s: %s", peer, e.message)
            writer.write(text_response(e.status, e.reason, e.message + "\n"))
            return
        if req is None:
            return
        m = ROUTE.match(req.path)
        if m is None:
            writer.write(text_response(404, "Not Found", NOT_FOUND.decode()))
            return
        if req.method not in ("GET", "POST"):
            writer.write(text_response(405, "Method Not Allowed", "method not allowed\n"))
            return
        # The first request presenting a token consumes it, whatever happens next.
        request = self.tokens.consume(m.group(2))
        if request is None or not isinstance(request, KIND[m.group(1)]):
            writer.write(text_response(404, "Not Found", NOT_FOUND.decode()))
            return
        if is_websocket(req):
            await self._websocket(req, request, reader, writer, peer)
        else:
            await self._spdy(req, request, reader, writer, peer)

    async def _upgraded(self, peer: str, session: Session) -> bool:
        """Run an upgraded session under the idle timeout; True if it ended idle.

        Idling cancels the session, so it unwinds as on stop(): SPDY streams get RST and
        GOAWAY, the backend's processes and sockets are released.
        """
        task = asyncio.current_task()
        assert task is not None

        def idle() -> None:
            task.cancel()

        watch = IdleWatch(float(self.config.idle_timeout_seconds), idle)
        try:
            await session(watch.touch)
        except asyncio.CancelledError:
            if not watch.fired:
                raise  # stop(), not us
        finally:
            watch.cancel()
        if not watch.fired:
            return False
        task.uncancel()
        log.info(
            "streaming connection from %s: no stream data for %d s; closed",
            peer,
            self.config.idle_timeout_seconds,
        )
        return True

    # --- SPDY ---

    async def _spdy(
        self,
        req: HttpRequest,
        request: StreamRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        outcome = spdy_upgrade(req, request)
        if isinstance(outcome, bytes):
            writer.write(outcome)
            return
        chosen = outcome.protocol
        writer.write(outcome.head)
        # Nothing else goes out until the client's first frame: client-go discards
        # whatever arrives in the same read as the 101 (the server never starts frames).
        await writer.drain()

        async def session(touch: Callable[[], None]) -> None:
            if isinstance(request, PortForwardRequest):
                pf = SpdyPortForward(self.backend, request, self.config.max_port_forward_pairs)
                await pf.run(SpdyConnection(reader, writer, pf.on_stream, self.spdy_limits, touch))
            else:
                await self._spdy_remotecommand(reader, writer, request, chosen, touch)

        await self._upgraded(peer, session)
        await _linger(reader, writer, LINGER_SECONDS)

    async def _spdy_remotecommand(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: ExecRequest | AttachRequest,
        version: str,
        touch: Callable[[], None],
    ) -> None:
        expected = {"error"}
        for name in ("stdin", "stdout", "stderr"):
            if getattr(request, name) and not (name == "stderr" and request.tty):
                expected.add(name)
        if request.tty and version not in (remotecommand.V1, remotecommand.V2):
            expected.add("resize")
        streams: dict[str, SpdyStream] = {}
        complete = asyncio.Event()

        def on_stream(stream: SpdyStream) -> None:
            kind = stream.type
            if kind not in expected or kind in streams:
                # Refused, not buffered: nothing would ever read it.
                conn.warn_once("unexpected", "refusing unexpected %r stream %d", kind, stream.id)
                conn.reject(stream, spdy.REFUSED_STREAM)
                return
            conn.reply(stream)  # reply at once: the client waits for each reply in turn
            if kind in ("stdin", "resize"):
                stream.want()
            else:
                stream.ignore_input()  # output and error streams only go to the client
            streams[kind] = stream
            if len(streams) == len(expected):
                complete.set()

        conn = SpdyConnection(reader, writer, on_stream, self.spdy_limits, touch)
        read_task = asyncio.create_task(conn.run())
        try:
            waiter = asyncio.create_task(complete.wait())
            await asyncio.wait(
                {waiter, read_task},
                timeout=STREAM_CREATION_TIMEOUT,
                return_when=asyncio.FIRST_COMPLETED,
            )
            waiter.cancel()
            if not complete.is_set():
                if not read_task.done():
                    log.info("timed out waiting for client streams; closing")
                return
            if version == remotecommand.V1:
                # v1 parity: stdin is closed from our side and errors are never shown.
                if "stdin" in streams:
                    await streams["stdin"].close()
                streams["error"].reset()
            io = SessionIO(
                version=version,
                error=streams["error"],
                stdin=streams.get("stdin"),
                stdout=streams.get("stdout"),
                stderr=streams.get("stderr"),
                resize=streams.get("resize"),
            )
            await run_session(self.backend, request, io, conn.done)
        finally:
            await conn.shutdown()
            read_task.cancel()
            await asyncio.gather(read_task, return_exceptions=True)

    # --- WebSocket ---

    async def _websocket(
        self,
        req: HttpRequest,
        request: StreamRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        outcome = websocket_upgrade(req, request, self.config.max_port_forward_pairs)
        if isinstance(outcome, bytes):
            writer.write(outcome)
            return
        chosen = outcome.protocol
        writer.write(outcome.head)
        await writer.drain()
        ws = WebSocket(reader, writer)

        async def session(touch: Callable[[], None]) -> None:
            if not isinstance(request, PortForwardRequest):
                ws.on_activity = touch
                await serve_remotecommand(ws, chosen, self.backend, request)
            elif chosen == TUNNEL_PORTFORWARD:
                ws.owned = True
                pf = SpdyPortForward(self.backend, request, self.config.max_port_forward_pairs)
                tunnel = (TunnelSource(ws), TunnelSink(ws))
                await pf.run(SpdyConnection(*tunnel, pf.on_stream, self.spdy_limits, touch))
                await ws.close()
            else:
                ws.on_activity = touch
                await serve_legacy_portforward(ws, chosen, self.backend, request)

        if await self._upgraded(peer, session):
            await ws.close(CLOSE_GOING_AWAY, wait=1.0)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secs: float) -> None:
    """Half-close and read until the client closes, so unread input cannot turn our close
    into a TCP RST that destroys output the client has not read yet. Bounded as a whole:
    a peer that reads nothing, or sends forever, does not keep its slot."""
    with contextlib.suppress(TimeoutError, ConnectionError, OSError, RuntimeError):
        async with asyncio.timeout(secs):
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            while await reader.read(65536):
                pass


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close, flushing what is queued; a peer that will not take it is cut off."""
    writer.close()
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except Exception:  # the peer reset: the socket is gone either way
        pass
