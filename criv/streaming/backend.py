"""How the streaming server reaches processes and ports: the backend interface.

The protocol code (SPDY, WebSocket, remotecommand, port-forward) only talks to these
types. A backend hands back *streams*: byte readers and writers that stay open for the
whole session, so bytes flow without one call per chunk. Implementations:

* :class:`criv.streaming.local.LocalProcessBackend`: processes on this host; for tests
  and development of the protocol layer, not the path pods take.
* the agent backend (vm and host pods), reaching the guest agent's data streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from criv.errors import CrivError


class StreamingError(CrivError):
    """The backend could not start or reach what a stream asked for.

    The message is shown to the user (on the error stream), so it should say what failed.
    """


class PortForwardRefused(StreamingError):
    """Nothing accepted the connection on that port inside the sandbox."""


class ByteReader(Protocol):
    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" at end of stream."""
        ...


class ByteWriter(Protocol):
    async def write(self, data: bytes) -> None:
        """Write all of ``data``; waits while the other side is slow (backpressure)."""
        ...

    async def close(self) -> None:
        """End of input for the other side (EOF on the process's stdin)."""
        ...


class ProcessStreams(Protocol):
    """The stdio of an exec'd process, or of a container being attached to.

    ``stdin``/``stdout``/``stderr`` are None where the session has none. Under a tty,
    stderr is None and the terminal's output comes on ``stdout``.
    """

    @property
    def stdin(self) -> ByteWriter | None: ...

    @property
    def stdout(self) -> ByteReader | None: ...

    @property
    def stderr(self) -> ByteReader | None: ...

    async def resize(self, width: int, height: int) -> None:
        """Set the terminal size; a no-op without a tty."""
        ...

    async def wait(self) -> int:
        """The exit code of an exec'd process (128+N for a signal death).

        For an attach session it returns when the attachment ends (the container's output
        ended); the value is then not reported to the client.
        """
        ...

    async def close(self) -> None:
        """Release everything (the client went away, or the session is over); idempotent."""
        ...


class DuplexStream(Protocol):
    """A connection to a port inside a sandbox."""

    async def read(self, n: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close_write(self) -> None:
        """Half-close toward the port (the client sent FIN)."""
        ...

    async def close(self) -> None:
        """Close both directions; idempotent."""
        ...


async def write_drained(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write and wait for room; a connection that went away makes it a no-op (the session
    notices through the other direction and ends)."""
    if writer.is_closing():
        return
    writer.write(data)
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()


class SocketDuplex:
    """A DuplexStream over an asyncio stream pair (a TCP or agent data connection).

    Errors on a connection that went away read as EOF and make writes no-ops: the
    session notices through the other direction and ends.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._r = reader
        self._w = writer

    async def read(self, n: int) -> bytes:
        try:
            return await self._r.read(n)
        except (ConnectionError, OSError):
            return b""

    async def write(self, data: bytes) -> None:
        await write_drained(self._w, data)

    async def close_write(self) -> None:
        # The peer sees EOF (the agent half-closes toward the pod's socket in turn).
        with contextlib.suppress(ConnectionError, OSError):
            if self._w.can_write_eof() and not self._w.is_closing():
                self._w.write_eof()

    async def close(self) -> None:
        self._w.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._w.wait_closed()


class StreamingBackend(Protocol):
    async def exec(
        self, container_id: str, cmd: list[str], tty: bool, stdin: bool
    ) -> ProcessStreams:
        """Start ``cmd`` in the container. Raise StreamingError (or a CrivError) on failure."""
        ...

    async def attach(self, container_id: str, tty: bool, stdin: bool) -> ProcessStreams:
        """Attach to the container's own stdio.

        The backend decides what the container allows: no stdin stream if it was created
        without stdin; with ``stdin_once`` the container's stdin closes when this
        session's stdin ends.
        """
        ...

    async def port_forward(self, sandbox_id: str, port: int) -> DuplexStream:
        """Connect to 127.0.0.1:``port`` as the sandbox sees it.

        Raise :class:`PortForwardRefused` when nothing listens there.
        """
        ...
