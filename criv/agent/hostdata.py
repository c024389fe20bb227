"""A data endpoint served by criv itself, for agents criv implements in-process.

``vm-image`` pods have no agent process: criv answers the agent API for them itself
(:mod:`criv.sandbox.vmimage`). The sandbox layer and the streaming server still open
data connections to the pod's data socket exactly as for any agent
(:mod:`criv.agent.logstream`, :mod:`criv.agent.datastream`), so this module serves that
socket with the agent's handshake (``StreamOpen`` / ``StreamAccept``, as
``criv_agent.datastream``) and hands each stream to a :class:`DataHandler`:

- LOG: a :class:`LogSource` (a CRI log file, followed from ``offset`` until complete);
- STDIO: ``run_exec(exec_id, reader, writer)`` speaks the STDIO frames
  (``criv_agent.execframes``) itself;
- PORT_FORWARD: ``dial(port)`` gives the upstream connection.

The handshake is parsed here so that nothing outside ``criv/agent`` touches protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Protocol

from criv.agent.logstream import MAX_HEADER
from criv_agent.api.agent.v1 import agent_pb2
from criv_agent.datastream import frame, read_message

log = logging.getLogger("criv.agent.hostdata")

HANDSHAKE_TIMEOUT = 10.0
CHUNK = 256 * 1024
POLL = 1.0


class LogSource(Protocol):
    path: Path

    @property
    def complete(self) -> bool:
        """No more will be written (read "complete" before reading: see _log)."""
        ...

    async def wait_change(self, timeout: float) -> None: ...


class DataHandler(Protocol):
    def log_source(self, container_id: str) -> LogSource | None: ...

    def has_exec(self, exec_id: str) -> bool: ...

    async def run_exec(
        self, exec_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None: ...

    async def dial(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


class HostDataServer:
    """Serves one pod's data socket at ``path`` for ``handler``."""

    def __init__(self, path: Path, handler: DataHandler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                raw = await asyncio.wait_for(read_message(reader), HANDSHAKE_TIMEOUT)
                if len(raw) > MAX_HEADER:
                    return
                req = agent_pb2.StreamOpen.FromString(raw)
            except (asyncio.IncompleteReadError, TimeoutError, ValueError) as e:
                log.debug("bad data stream handshake: %s", e)
                return
            if req.kind == agent_pb2.StreamOpen.LOG:
                await self._log(req.container_id, req.offset, writer)
            elif req.kind == agent_pb2.StreamOpen.STDIO:
                if not req.exec_id or not self.handler.has_exec(req.exec_id):
                    await _accept(writer, False, "attach is not supported; use exec")
                    return
                await _accept(writer, True, "")
                await self.handler.run_exec(req.exec_id, reader, writer)
            elif req.kind == agent_pb2.StreamOpen.PORT_FORWARD:
                await self._port_forward(req.port, reader, writer)
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

    async def _log(self, cid: str, offset: int, writer: asyncio.StreamWriter) -> None:
        src = self.handler.log_source(cid)
        if src is None:
            await _accept(writer, False, f"container {cid[:64]} not found")
            return
        try:
            fd = os.open(src.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            await _accept(writer, False, "log file not found")
            return
        with os.fdopen(fd, "rb", buffering=0) as f:
            f.seek(max(offset, 0))
            await _accept(writer, True, "")
            while True:
                complete = src.complete
                chunk = f.read(CHUNK)
                if chunk:
                    writer.write(chunk)
                    await writer.drain()
                    continue
                if complete:
                    return
                await src.wait_change(POLL)

    async def _port_forward(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not 0 < port < 65536:
            await _accept(writer, False, f"bad port {port}")
            return
        try:
            up_r, up_w = await asyncio.wait_for(self.handler.dial(port), HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError) as e:
            await _accept(writer, False, f"connect to port {port}: {e}")
            return
        await _accept(writer, True, "")
        try:
            await asyncio.gather(_copy(reader, up_w), _copy(up_r, writer))
        finally:
            up_w.close()


async def _accept(writer: asyncio.StreamWriter, ok: bool, error: str) -> None:
    writer.write(frame(agent_pb2.StreamAccept(ok=ok, error=error).SerializeToString()))
    await writer.drain()


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while chunk := await src.read(CHUNK):
            dst.write(chunk)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        pass
