"""A data endpoint served by criv itself, for agents criv implements in-process.

``vm-image`` pods have no agent process: criv answers the agent API for them itself
(:mod:`criv.sandbox.vmimage`). The sandbox layer and the streaming server still open
data connections to the pod's data socket exactly as for any agent
(:mod:`criv.agent.logstream`, :mod:`criv.agent.datastream`), so this module serves that
socket with the agent's handshake (``StreamOpen`` / ``StreamAccept``, as
``criv_agent.datastream``) and hands each stream to a :class:`DataHandler`:

- LOG: a ``FollowedLog`` (a CRI log file, followed from ``offset`` until complete);
- STDIO: ``run_exec(exec_id, reader, writer)`` speaks the STDIO frames
  (``criv_agent.execframes``) itself; without an exec_id (attach), ``attach(container_id)``
  gives the session that does (or raises a CrivError, the refusal's reason);
- PORT_FORWARD: ``dial(port)`` gives the upstream connection.

The handshake is parsed here so that nothing outside ``criv/agent`` touches protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from criv.errors import CrivError
from criv_agent.api.agent.v1 import agent_pb2
from criv_agent.datastream import (
    FollowedLog,
    StreamEndpoint,
    send_accept,
    serve_log,
    serve_port_forward,
)


class DataHandler(Protocol):
    def log_source(self, container_id: str) -> FollowedLog | None: ...

    def has_exec(self, exec_id: str) -> bool: ...

    async def run_exec(
        self, exec_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None: ...

    async def dial(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...

    async def attach(self, container_id: str) -> AttachSession: ...


AttachSession = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class HostDataServer:
    """Serves one pod's data socket at ``path`` for ``handler``, through the agent's own
    stream endpoint (handshake, log following, port-forward copying)."""

    def __init__(self, path: Path, handler: DataHandler) -> None:
        self.path = path
        self.handler = handler
        self._endpoint = StreamEndpoint(self._route)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._endpoint.handle, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._endpoint.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _route(
        self, req: agent_pb2.StreamOpen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if req.kind == agent_pb2.StreamOpen.LOG:
            source = self.handler.log_source(req.container_id)
            await serve_log(source, req.container_id, req.offset, writer)
        elif req.kind == agent_pb2.StreamOpen.STDIO:
            if not req.exec_id:
                try:
                    session = await self.handler.attach(req.container_id)
                except CrivError as e:
                    await send_accept(writer, False, e.message)
                    return
                await send_accept(writer, True, "")
                await session(reader, writer)
                return
            if not self.handler.has_exec(req.exec_id):
                await send_accept(writer, False, f"no pending exec {req.exec_id[:16]!r}")
                return
            await send_accept(writer, True, "")
            await self.handler.run_exec(req.exec_id, reader, writer)
        elif req.kind == agent_pb2.StreamOpen.PORT_FORWARD:
            await serve_port_forward(self.handler.dial, req.port, reader, writer)
        else:
            await send_accept(writer, False, "unsupported")
