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
from typing import TYPE_CHECKING

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


class DataServer:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
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
            kind = req.kind
            if kind == agent_pb2.StreamOpen.LOG:
                await self._log(req, writer)
            elif kind == agent_pb2.StreamOpen.PORT_FORWARD:
                await self._port_forward(req, reader, writer)
            elif kind == agent_pb2.StreamOpen.STDIO:
                await self._stdio(req, reader, writer)
            else:
                await _accept(writer, False, "unsupported")
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    async def _log(self, req: agent_pb2.StreamOpen, writer: asyncio.StreamWriter) -> None:
        sink = self.runtime.sinks.get(req.container_id)
        if sink is None:
            await _accept(writer, False, f"container {req.container_id} not found")
            return
        try:
            fd = os.open(sink.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            await _accept(writer, False, "log file not found")
            return
        with os.fdopen(fd, "rb", buffering=0) as f:
            f.seek(max(req.offset, 0))
            await _accept(writer, True, "")
            while True:
                # read "complete" before reading, so a write racing with the last read
                # is still sent in the next round
                complete = sink.complete
                chunk = f.read(_CHUNK)
                if chunk:
                    writer.write(chunk)
                    await writer.drain()
                    continue
                if complete:
                    return
                await sink.wait_change(_POLL)

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
                await _accept(writer, False, str(e))
                return
            await _accept(writer, True, "")
            cid = req.container_id
            await serve_attach(io, reader, writer, lambda: self.runtime.exit_code(cid))
            return
        ex = self.runtime.execs.take(req.exec_id)
        if ex is None:
            await _accept(writer, False, f"unknown or expired exec {req.exec_id!r}")
            return
        await _accept(writer, True, "")
        await self.runtime.execs.run(ex, reader, writer)

    async def _port_forward(
        self,
        req: agent_pb2.StreamOpen,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if not 0 < req.port < 65536:
            await _accept(writer, False, f"bad port {req.port}")
            return
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", req.port), HANDSHAKE_TIMEOUT
            )
        except (OSError, TimeoutError) as e:
            await _accept(writer, False, f"connect 127.0.0.1:{req.port}: {e}")
            return
        await _accept(writer, True, "")
        try:
            await asyncio.gather(_copy(reader, up_w), _copy(up_r, writer))
        finally:
            up_w.close()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t


async def _accept(writer: asyncio.StreamWriter, ok: bool, error: str) -> None:
    writer.write(frame(agent_pb2.StreamAccept(ok=ok, error=error).SerializeToString()))
    await writer.drain()


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while chunk := await src.read(_CHUNK):
            dst.write(chunk)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        pass
