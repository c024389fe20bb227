"""The data endpoint: one connection per byte stream (DESIGN.md, "The agent channel").

Handshake: the host writes a 4-byte big-endian length and a serialized ``StreamOpen``;
the agent answers with a length-prefixed ``StreamAccept``; then raw bytes flow.

- LOG: the container's CRI log file from byte ``offset``, followed as it grows; the
  agent closes the connection once the container's stdio hit EOF and everything up to
  the end of the file was sent.
- PORT_FORWARD: a TCP connection to 127.0.0.1:port in the agent's network namespace
  (the pod's), bytes copied both ways until either side closes.
- STDIO: the stdio of a process registered by StartExec (execstream.py), or with an
  empty ``exec_id``, an attach to the container's own stdio (attach.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from criv_agent.api.agent.v1 import agent_pb2
from criv_agent.attach import serve_attach
from criv_agent.errors import AgentError

if TYPE_CHECKING:
    from criv_agent.runtime import Runtime

log = logging.getLogger(__name__)

MAX_HEADER = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0
_CHUNK = 256 * 1024
_POLL = 1.0  # re-check the log even without a change notification


async def read_message(reader: asyncio.StreamReader) -> bytes:
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    if n > MAX_HEADER:
        raise ValueError(f"header of {n} bytes")
    return await reader.readexactly(n)


def frame(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class FollowedLog(Protocol):
    """A CRI log file that may still grow."""

    @property
    def path(self) -> str | os.PathLike[str]: ...

    @property
    def complete(self) -> bool:
        """No more will be written."""
        ...

    async def wait_change(self, timeout: float) -> None: ...


Route = Callable[
    [agent_pb2.StreamOpen, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
]
Dial = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class StreamEndpoint:
    """One data connection per stream: the handshake, then ``route`` serves it; the
    connections in flight are cancelled by ``close``. The agent's DataServer and criv's
    in-process agents (criv/agent/hostdata.py) both serve through it."""

    def __init__(self, route: Route) -> None:
        self._route = route
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                raw = await asyncio.wait_for(read_message(reader), HANDSHAKE_TIMEOUT)
                req = agent_pb2.StreamOpen.FromString(raw)
            except (asyncio.IncompleteReadError, TimeoutError, ValueError) as e:
                log.debug("bad data stream handshake: %s", e)
                return
            await self._route(req, reader, writer)
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t


class DataServer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.endpoint = StreamEndpoint(self._route)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.endpoint.handle(reader, writer)

    async def close(self) -> None:
        await self.endpoint.close()

    async def _route(
        self, req: agent_pb2.StreamOpen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        kind = req.kind
        if kind == agent_pb2.StreamOpen.LOG:
            sink = self.runtime.sinks.get(req.container_id)
            await serve_log(sink, req.container_id, req.offset, writer)
        elif kind == agent_pb2.StreamOpen.PORT_FORWARD:
            await serve_port_forward(_dial_local, req.port, reader, writer)
        elif kind == agent_pb2.StreamOpen.STDIO:
            await self._stdio(req, reader, writer)
        else:
            await send_accept(writer, False, "unsupported")

    async def _stdio(
        self,
        req: agent_pb2.StreamOpen,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if not req.exec_id and req.container_id:
            try:
                io = self.runtime.attach_io(req.container_id)
            except AgentError as e:
                await send_accept(writer, False, str(e))
                return
            await send_accept(writer, True, "")
            cid = req.container_id
            await serve_attach(io, reader, writer, lambda: self.runtime.exit_code(cid))
            return
        ex = self.runtime.execs.take(req.exec_id)
        if ex is None:
            await send_accept(writer, False, f"unknown or expired exec {req.exec_id!r}")
            return
        await send_accept(writer, True, "")
        await self.runtime.execs.run(ex, reader, writer)


async def _dial_local(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # in the agent's network namespace: the pod's
    return await asyncio.open_connection("127.0.0.1", port)


async def serve_log(
    source: FollowedLog | None, cid: str, offset: int, writer: asyncio.StreamWriter
) -> None:
    """The log from ``offset``, followed until ``source`` is complete and all was sent."""
    if source is None:
        await send_accept(writer, False, f"container {cid[:64]} not found")
        return
    try:
        fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        await send_accept(writer, False, "log file not found")
        return
    with os.fdopen(fd, "rb", buffering=0) as f:
        f.seek(max(offset, 0))
        await send_accept(writer, True, "")
        while True:
            # read "complete" before reading, so a write racing with the last read is
            # still sent in the next round
            complete = source.complete
            chunk = f.read(_CHUNK)
            if chunk:
                writer.write(chunk)
                await writer.drain()
                continue
            if complete:
                return
            await source.wait_change(_POLL)


async def serve_port_forward(
    dial: Dial, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Bytes both ways between the stream and ``dial(port)`` until either side closes."""
    if not 0 < port < 65536:
        await send_accept(writer, False, f"bad port {port}")
        return
    try:
        up_r, up_w = await asyncio.wait_for(dial(port), HANDSHAKE_TIMEOUT)
    except (OSError, TimeoutError) as e:
        await send_accept(writer, False, f"connect to port {port}: {e}")
        return
    await send_accept(writer, True, "")
    try:
        await asyncio.gather(pump(reader, up_w), pump(up_r, writer))
    finally:
        up_w.close()


async def send_accept(writer: asyncio.StreamWriter, ok: bool, error: str) -> None:
    writer.write(frame(agent_pb2.StreamAccept(ok=ok, error=error).SerializeToString()))
    await writer.drain()


async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the EOF on (a half-close)."""
    try:
        while chunk := await src.read(_CHUNK):
            dst.write(chunk)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        pass
