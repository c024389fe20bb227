"""Attach (CRI Attach): a container's own stdio, shared by any number of sessions.

A container created with ``stdin`` gets a stdin pipe whose write end the agent keeps
(under a tty the pty master is the terminal's input). Its output is read once, by the
log pump (stdio.py), which also hands every chunk to :class:`ContainerIO`; that fans it
out to the attach sessions connected at that moment (no history: the log has that).

An attach session is a STDIO data stream with ``container_id`` set and ``exec_id``
empty, speaking the exec frames (execframes.py): STDIN, CLOSE 0 (this session's stdin
ended: with ``stdin_once`` that closes the container's stdin), RESIZE from the host;
STDOUT/STDERR, CLOSE 1/2 when the container's output ended, then EXIT with the
container's exit code, from the agent.

The container never waits for an attach client: a session that falls more than
``SESSION_BUFFER`` behind loses output (the CRI log still has every byte).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import logging
import os
import struct
import termios
from collections.abc import Awaitable, Callable

from criv_agent.errors import AgentError
from criv_agent.execframes import (
    CLOSE,
    RESIZE,
    STDERR,
    STDIN,
    STDOUT,
    FrameTooLarge,
    close_frame,
    exit_frame,
    frame,
    parse_resize,
    read_frame,
)

log = logging.getLogger(__name__)

SESSION_BUFFER = 4 << 20
EXIT_WAIT = 5.0  # output ended: the init's exit normally follows at once
_KIND = {"stdout": STDOUT, "stderr": STDERR}


class AttachSession:
    """One host connection's view of the container's output: a bounded frame queue."""

    def __init__(self, streams: tuple[str, ...]) -> None:
        self._frames: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._ready = asyncio.Event()
        self.open_streams = set(streams)
        self.output_ended = asyncio.Event()
        self._dropped = False

    def put(self, stream: str, data: bytes) -> None:
        if self._size + len(data) > SESSION_BUFFER:
            if not self._dropped:
                log.info("attach client too slow: dropping output (the log keeps it)")
                self._dropped = True
            return
        self._push(frame(_KIND[stream], data))

    def stream_ended(self, stream: str) -> None:
        if stream in self.open_streams:
            self.open_streams.discard(stream)
            self._push(close_frame(_KIND[stream]))
            if not self.open_streams:
                self.output_ended.set()

    def _push(self, f: bytes) -> None:
        self._frames.append(f)
        self._size += len(f)
        self._ready.set()

    async def send_all(self, writer: asyncio.StreamWriter) -> None:
        """Forward frames until the output ended and every frame went out."""
        while True:
            while self._frames:
                f = self._frames.popleft()
                self._size -= len(f)
                writer.write(f)
                await writer.drain()
            if self.output_ended.is_set():
                return
            self._ready.clear()
            await self._ready.wait()


class ContainerIO:
    """The live side of a container's stdio: its stdin, terminal and attach sessions."""

    def __init__(
        self, tty: bool, stdin_once: bool, stdin_fd: int | None, master_fd: int | None
    ) -> None:
        self.tty = tty
        self.stdin_once = stdin_once
        self._stdin = stdin_fd  # ours; None without stdin or once closed
        self._master = master_fd  # a dup of the pty master, for resizes (tty only)
        self._open = {"stdout"} if tty else {"stdout", "stderr"}
        self.sessions: set[AttachSession] = set()
        self._stdin_lock = asyncio.Lock()
        if stdin_fd is not None:
            os.set_blocking(stdin_fd, False)

    @property
    def has_stdin(self) -> bool:
        return self._stdin is not None

    def new_session(self) -> AttachSession:
        s = AttachSession(tuple(sorted(self._open)))
        if not self._open:
            s.output_ended.set()
        self.sessions.add(s)
        return s

    # called by the log pump, on the event loop
    def feed(self, stream: str, data: bytes) -> None:
        for s in self.sessions:
            s.put(stream, data)

    def stream_ended(self, stream: str) -> None:
        self._open.discard(stream)
        for s in self.sessions:
            s.stream_ended(stream)

    async def write_stdin(self, data: bytes) -> None:
        # Non-blocking writes awaited on the loop: a container that never reads its
        # stdin must not pin a thread (the agent could not exit cleanly).
        async with self._stdin_lock:
            loop = asyncio.get_running_loop()
            view = memoryview(data)
            while view and self._stdin is not None:
                fd = self._stdin
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    ready = asyncio.Event()
                    loop.add_writer(fd, ready.set)
                    try:
                        await ready.wait()
                    finally:
                        loop.remove_writer(fd)
                except OSError as e:
                    if e.errno not in (errno.EPIPE, errno.EIO, errno.EBADF):
                        raise
                    return  # the container closed its stdin or exited

    async def stdin_ended(self) -> None:
        """An attach session's stdin ended; with stdin_once so does the container's."""
        if not self.stdin_once or self._stdin is None:
            return
        if self.tty:
            await self.write_stdin(b"\x04")  # a terminal's EOF; the pty itself stays
        else:
            async with self._stdin_lock:
                self._close_stdin()

    def resize(self, width: int, height: int) -> None:
        if self._master is not None:
            with contextlib.suppress(OSError):
                winsize = struct.pack("HHHH", height, width, 0, 0)
                fcntl.ioctl(self._master, termios.TIOCSWINSZ, winsize)

    def _close_stdin(self) -> None:
        if self._stdin is not None:
            os.close(self._stdin)
        self._stdin = None

    def close(self) -> None:
        """The container is removed (or the agent exits): release the fds, end sessions."""
        self._close_stdin()
        if self._master is not None:
            os.close(self._master)
            self._master = None
        for stream in list(self._open):
            self.stream_ended(stream)


async def serve_attach(
    io: ContainerIO,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    exit_code: Callable[[], Awaitable[int]],
) -> None:
    """Run one attach session until the container's output ended (or the host left)."""
    session = io.new_session()
    sender = asyncio.ensure_future(session.send_all(writer))
    receiver = asyncio.ensure_future(_receive(io, reader))
    try:
        await asyncio.wait([sender, receiver], return_when=asyncio.FIRST_COMPLETED)
        if sender.done():
            sender.result()
            try:
                code = await asyncio.wait_for(exit_code(), EXIT_WAIT)
            except TimeoutError:
                code = 255  # output ended but the init lingers; say something final
            except AgentError:
                code = 255  # removed meanwhile: its status is gone with it
            writer.write(exit_frame(code))
            await writer.drain()
    finally:
        io.sessions.discard(session)
        for t in (sender, receiver):
            t.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)


async def _receive(io: ContainerIO, reader: asyncio.StreamReader) -> None:
    """Host frames to the container; returns when the host hung up."""
    while True:
        try:
            kind, payload = await read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError, FrameTooLarge):
            return
        if kind == STDIN:
            await io.write_stdin(payload)
        elif kind == CLOSE and payload[:1] == bytes([STDIN]):
            await io.stdin_ended()
        elif kind == RESIZE and (size := parse_resize(payload)) is not None:
            io.resize(*size)
