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
from dataclasses import dataclass

from criv.config import StreamingConfig
from criv.streaming import remotecommand, spdy
from criv.streaming.backend import StreamingBackend
from criv.streaming.portforward import PROTOCOL as PORTFORWARD_PROTOCOL
from criv.streaming.portforward import SpdyPortForward
from criv.streaming.remotecommand import SPDY_PROTOCOLS, SessionIO, run_session
from criv.streaming.requests import AttachRequest, ExecRequest, PortForwardRequest, StreamRequest
from criv.streaming.spdy_conn import SpdyConnection, SpdyStream
from criv.streaming.tokens import TokenCache
from criv.streaming.websocket import WebSocket, accept_key
from criv.streaming.wschannels import (
    EXEC_PROTOCOLS,
    PORTFORWARD_PROTOCOLS,
    TUNNEL_PORTFORWARD,
    TunnelSink,
    TunnelSource,
    serve_legacy_portforward,
    serve_remotecommand,
)

log = logging.getLogger("criv.streaming")

MAX_HEADER_BYTES = 64 * 1024
HEADER_TIMEOUT = 30.0
STREAM_CREATION_TIMEOUT = 30.0
LINGER_SECONDS = 3.0
ROUTE = re.compile(r"^/(exec|attach|portforward)/([A-Za-z0-9_-]+)$")
KIND = {"exec": ExecRequest, "attach": AttachRequest, "portforward": PortForwardRequest}
NOT_FOUND = b"404 page not found\n"


@dataclass
class HttpRequest:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]  # names lower-cased, in order, repeats kept

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


def parse_request(raw: bytes) -> HttpRequest:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("bad request line")
    method, target, _ = parts
    path, _, query = target.partition("?")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError("bad header line")
        headers.append((name.strip().lower(), value.strip()))
    return HttpRequest(method, path, query, headers)


def response(status: int, reason: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    head = [f"HTTP/1.1 {status} {reason}"]
    if status != 101:
        headers = [
            *headers,
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    head += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _text(status: int, reason: str, body: str, extra: list[tuple[str, str]] | None = None) -> bytes:
    headers = [("Content-Type", "text/plain; charset=utf-8"), *(extra or [])]
    return response(status, reason, headers, body.encode())


def offered_spdy_protocols(req: HttpRequest) -> list[str]:
    out: list[str] = []
    for line in req.get_all("x-stream-protocol-version"):
        out += [p.strip() for p in line.split(",") if p.strip()]
    return out


def is_websocket(req: HttpRequest) -> bool:
    upgrade = (req.get("upgrade") or "").lower()
    connection = " ".join(req.get_all("connection")).lower()
    return upgrade == "websocket" and "upgrade" in connection


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
        try:
            await self._handle(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # stop() cancels live sessions; end quietly, since asyncio's connection
            # callback would otherwise log the cancellation as an error.
            pass
        except Exception:
            log.exception("streaming session failed")
        finally:
            self._sessions.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEADER_TIMEOUT):
                raw = await reader.readuntil(b"\r\n\r\n")
            req = parse_request(raw)
        except (ValueError, asyncio.LimitOverrunError, TimeoutError):
            writer.write(_text(400, "Bad Request", "bad request\n"))
            return
        m = ROUTE.match(req.path)
        if m is None:
            writer.write(_text(404, "Not Found", NOT_FOUND.decode()))
            return
        if req.method not in ("GET", "POST"):
            writer.write(_text(405, "Method Not Allowed", "method not allowed\n"))
            return
        # The first request presenting a token consumes it, whatever happens next.
        request = self.tokens.consume(m.group(2))
        if request is None or not isinstance(request, KIND[m.group(1)]):
            writer.write(_text(404, "Not Found", NOT_FOUND.decode()))
            return
        if is_websocket(req):
            await self._websocket(req, request, reader, writer)
        else:
            await self._spdy(req, request, reader, writer)

    # --- SPDY ---

    async def _spdy(
        self,
        req: HttpRequest,
        request: StreamRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        offered = offered_spdy_protocols(req)
        if not offered:
            writer.write(
                _text(
                    400,
                    "Bad Request",
                    "unable to upgrade: header X-Stream-Protocol-Version "
                    "does not exist or is empty\n",
                )
            )
            return
        supported = (
            (PORTFORWARD_PROTOCOL,) if isinstance(request, PortForwardRequest) else SPDY_PROTOCOLS
        )
        chosen = next((p for p in offered if p in supported), None)
        if chosen is None:
            body = (
                f"unable to upgrade: unable to negotiate protocol: client supports "
                f"[{' '.join(offered)}], server accepts [{' '.join(supported)}]"
            )
            accepted = [("X-Accepted-Stream-Protocol-Versions", p) for p in supported]
            writer.write(_text(403, "Forbidden", body + "\n", accepted))
            return
        connection = " ".join(req.get_all("connection")).lower()
        upgrade = " ".join(req.get_all("upgrade")).lower()
        if "upgrade" not in connection or "spdy/3.1" not in upgrade:
            writer.write(_text(400, "Bad Request", "unable to upgrade: missing upgrade headers\n"))
            return
        writer.write(
            response(
                101,
                "Switching Protocols",
                [
                    ("Connection", "Upgrade"),
                    ("Upgrade", "SPDY/3.1"),
                    ("X-Stream-Protocol-Version", chosen),
                ],
            )
        )
        # Nothing else goes out until the client's first frame: client-go discards
        # whatever arrives in the same read as the 101 (the server never starts frames).
        await writer.drain()
        if isinstance(request, PortForwardRequest):
            pf = SpdyPortForward(self.backend, request)
            await pf.run(SpdyConnection(reader, writer, pf.on_stream))
        else:
            await self._spdy_remotecommand(reader, writer, request, chosen)
        await _linger(reader, writer)

    async def _spdy_remotecommand(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: ExecRequest | AttachRequest,
        version: str,
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
            conn.reply(stream)  # reply at once: the client waits for each reply in turn
            kind = stream.type
            if kind in expected and kind not in streams:
                streams[kind] = stream
                if len(streams) == len(expected):
                    complete.set()
            else:
                log.info("ignoring unexpected %r stream %d", kind, stream.id)

        conn = SpdyConnection(reader, writer, on_stream)
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
    ) -> None:
        if req.method != "GET":
            writer.write(_text(405, "Method Not Allowed", "method not allowed\n"))
            return
        key = req.get("sec-websocket-key")
        if not key:
            writer.write(_text(400, "Bad Request", "missing Sec-WebSocket-Key\n"))
            return
        if req.get("sec-websocket-version") != "13":
            writer.write(
                _text(
                    400,
                    "Bad Request",
                    "unsupported WebSocket version\n",
                    [("Sec-WebSocket-Version", "13")],
                )
            )
            return
        offered: list[str] = []
        for line in req.get_all("sec-websocket-protocol"):
            offered += [p.strip() for p in line.split(",") if p.strip()]
        allowed = (
            PORTFORWARD_PROTOCOLS if isinstance(request, PortForwardRequest) else EXEC_PROTOCOLS
        )
        chosen = next((p for p in (offered or [""]) if p in allowed), None)
        if chosen is None:
            writer.write(response(403, "Forbidden", []))
            return
        headers = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", accept_key(key)),
        ]
        if chosen:
            headers.append(("Sec-WebSocket-Protocol", chosen))
        writer.write(response(101, "Switching Protocols", headers))
        await writer.drain()
        ws = WebSocket(reader, writer)
        if isinstance(request, PortForwardRequest):
            if chosen == TUNNEL_PORTFORWARD:
                ws.owned = True
                pf = SpdyPortForward(self.backend, request)
                await pf.run(SpdyConnection(TunnelSource(ws), TunnelSink(ws), pf.on_stream))
                await ws.close()
            else:
                await serve_legacy_portforward(ws, chosen, self.backend, request)
        else:
            await serve_remotecommand(ws, chosen, self.backend, request)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close and read until the client closes, so unread input cannot turn our close
    into a TCP RST that destroys output the client has not read yet."""
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        async with asyncio.timeout(LINGER_SECONDS):
            while await reader.read(65536):
                pass
