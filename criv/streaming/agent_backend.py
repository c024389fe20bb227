"""The backend pods use: streams through the agent's data endpoint.

Proto-free on purpose (only ``criv/agent`` and ``criv/cri`` touch generated modules):
the daemon hands in an :class:`AgentLink` that makes the agent calls (``StartExec``)
and performs the StreamOpen/StreamAccept handshake of data connections
(``criv.agent.logstream.open_stream`` does exactly that), returning raw connections.

* exec: ``StartExec`` registers the command; a STDIO data stream naming the exec_id
  runs it and carries framed stdin/stdout/stderr, resizes and the exit code (the frame
  codec is the agent's own, ``criv_agent.execframes``; docs/agent-api.md).
* port-forward: a PORT_FORWARD data stream; the agent dials 127.0.0.1:port in the pod's
  network namespace (in the guest for `vm` pods).
* attach: a STDIO data stream naming the container and no exec_id; the agent fans the
  container's output out to it and feeds its stdin (for containers created with stdin),
  with the same frames; EXIT comes once the container's output ended.

The agent is untrusted: frame sizes and exit codes coming back are bounded here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass
from typing import Literal, Protocol

from criv.errors import CrivError
from criv.streaming.backend import (
    ByteReader,
    ByteWriter,
    DuplexStream,
    PortForwardRefused,
    ProcessStreams,
    SocketDuplex,
    StreamingError,
    write_drained,
)
from criv_agent import execframes as ef

log = logging.getLogger("criv.streaming.agent")

MAX_WRITE = 256 * 1024  # stdin chunks per frame, well under the agent's 1 MiB limit


@dataclass(frozen=True)
class DataStreamParams:
    """What a data connection is for (mirrors the agent API's StreamOpen)."""

    kind: Literal["stdio", "port_forward"]
    container_id: str = ""
    port: int = 0
    exec_id: str = ""


class AgentLink(Protocol):
    async def start_exec(
        self, container_id: str, cmd: list[str], tty: bool, stdin: bool
    ) -> tuple[str, str]:
        """``StartExec`` on the container's agent; returns (sandbox_id, exec_id)."""
        ...

    async def attach_target(self, container_id: str) -> tuple[str, str]:
        """(sandbox_id, full container id) of a running container to attach to."""
        ...

    async def open_data_stream(
        self, sandbox_id: str, params: DataStreamParams
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the sandbox's agent data endpoint and open one stream.

        Raise a CrivError (or OSError) if the agent refuses; its text reaches the user.
        """
        ...


class _Channel:
    """One output stream of an exec, fed by the demultiplexer; b"" once it ended."""

    # A slow client stops the demultiplexer at this much buffered output, which stops
    # reading the agent connection, which stops the process: backpressure end to end.
    LIMIT = 1 << 20

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._ended = False
        self._readable = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    async def read(self, n: int) -> bytes:
        while not self._chunks:
            if self._ended:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._size -= len(data)
        if self._size <= self.LIMIT:
            self._space.set()
        return data

    async def put(self, data: bytes) -> None:
        if data and not self._ended:
            self._chunks.append(data)
            self._size += len(data)
            self._readable.set()
            if self._size > self.LIMIT:
                self._space.clear()
                await self._space.wait()

    def end(self) -> None:
        self._ended = True
        self._readable.set()
        self._space.set()


class _Stdin:
    def __init__(self, exec_: _AgentExec) -> None:
        self._exec = exec_

    async def write(self, data: bytes) -> None:
        for i in range(0, len(data), MAX_WRITE):
            await self._exec.send(ef.frame(ef.STDIN, data[i : i + MAX_WRITE]))

    async def close(self) -> None:
        await self._exec.send(ef.close_frame(ef.STDIN))


class _AgentExec:
    """ProcessStreams over one STDIO data connection."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tty: bool, stdin: bool
    ) -> None:
        self._r = reader
        self._w = writer
        self._out = _Channel()
        self._err = None if tty else _Channel()
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.stdin: ByteWriter | None = _Stdin(self) if stdin else None
        self.stdout: ByteReader | None = self._out
        self.stderr: ByteReader | None = self._err
        self._demux = asyncio.create_task(self._read())

    async def send(self, data: bytes) -> None:
        await write_drained(self._w, data)

    async def _read(self) -> None:
        try:
            while True:
                kind, payload = await ef.read_frame(self._r)
                if kind == ef.STDOUT:
                    await self._out.put(payload)
                elif kind == ef.STDERR:
                    if self._err is not None:
                        await self._err.put(payload)
                elif kind == ef.CLOSE and payload == bytes([ef.STDOUT]):
                    self._out.end()
                elif kind == ef.CLOSE and payload == bytes([ef.STDERR]) and self._err:
                    self._err.end()
                elif kind == ef.EXIT and (code := ef.parse_exit(payload)) is not None:
                    # Clients parse the code as uint8; an agent saying otherwise is wrong.
                    self._set_exit(code if 0 <= code <= 255 else 255)
                    break
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except ef.FrameTooLarge as e:
            log.warning("exec stream: agent sent %s", e)
        finally:
            self._out.end()
            if self._err is not None:
                self._err.end()
            if not self._exit.done():
                self._exit.set_exception(
                    StreamingError("the agent closed the exec stream without an exit code")
                )

    def _set_exit(self, code: int) -> None:
        if not self._exit.done():
            self._exit.set_result(code)

    async def resize(self, width: int, height: int) -> None:
        await self.send(ef.resize_frame(width, height))

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    async def close(self) -> None:
        # Closing the connection is the signal: the agent kills a process still running.
        self._demux.cancel()
        await asyncio.gather(self._demux, return_exceptions=True)
        if not self._exit.done():
            self._exit.cancel()
        elif not self._exit.cancelled():
            self._exit.exception()  # seen: a session that ended early never awaited it
        self._w.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._w.wait_closed()


class _AgentAttach(_AgentExec):
    """An attach session: the same frames; leaving it is never a kill."""

    async def close(self) -> None:
        # A client that goes away ends its stdin: for a stdin_once container that closes
        # the container's stdin (as containerd does); the agent ignores it otherwise.
        if self.stdin is not None:
            await self.send(ef.close_frame(ef.STDIN))
        await super().close()


class AgentStreamingBackend:
    def __init__(self, link: AgentLink) -> None:
        self._link = link

    async def exec(
        self, container_id: str, cmd: list[str], tty: bool, stdin: bool
    ) -> ProcessStreams:
        try:
            sandbox_id, exec_id = await self._link.start_exec(container_id, cmd, tty, stdin)
            reader, writer = await self._link.open_data_stream(
                sandbox_id, DataStreamParams("stdio", container_id=container_id, exec_id=exec_id)
            )
        except CrivError:
            raise
        except Exception as e:  # OSError, the link's refusal type (e.g. StreamRefused)
            raise StreamingError(str(e) or type(e).__name__) from e
        return _AgentExec(reader, writer, tty, stdin)

    async def attach(self, container_id: str, tty: bool, stdin: bool) -> ProcessStreams:
        try:
            sandbox_id, cid = await self._link.attach_target(container_id)
            reader, writer = await self._link.open_data_stream(
                sandbox_id, DataStreamParams("stdio", container_id=cid)
            )
        except CrivError:
            raise
        except Exception as e:  # OSError, the link's refusal type (e.g. StreamRefused)
            raise StreamingError(str(e) or type(e).__name__) from e
        return _AgentAttach(reader, writer, tty, stdin)

    async def port_forward(self, sandbox_id: str, port: int) -> DuplexStream:
        try:
            reader, writer = await self._link.open_data_stream(
                sandbox_id, DataStreamParams("port_forward", port=port)
            )
        except (CrivError, OSError, EOFError) as e:
            raise PortForwardRefused(getattr(e, "message", None) or str(e)) from e
        except Exception as e:  # the link's own refusal type (e.g. StreamRefused)
            raise PortForwardRefused(str(e) or type(e).__name__) from e
        return SocketDuplex(reader, writer)
