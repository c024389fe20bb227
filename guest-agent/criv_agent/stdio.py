"""Container stdio: the agent holds the read ends of the container's stdout/stderr pipes
(or the pty master for tty containers) and turns them into the CRI log file.

Non-tty: two pipes; crun gets the write ends as its stdout/stderr and passes them on to
the container's init; the agent closes its copies after ``crun create``, so EOF on a read
end means every process holding the write end is gone. TTY: crun sends the pty master
over ``--console-socket`` (SCM_RIGHTS); everything read from it is ``stdout``.

Containers created with ``stdin`` (non-tty) also get a stdin pipe whose write end the
agent keeps for attach; output also goes to the attach sessions (attach.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from criv_agent.logs import CriLogFile

if TYPE_CHECKING:
    from criv_agent.attach import ContainerIO

_CHUNK = 64 * 1024


class LogSink:
    """One container's log file plus change notification for LOG stream followers.

    ``complete`` once every stream hit EOF (or when no writer exists, e.g. after an agent
    restart): followers then send to the end of the file and close.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: CriLogFile | None = None
        self._changed = asyncio.Event()

    @property
    def complete(self) -> bool:
        return self.file is None

    def open(self, streams: tuple[str, ...]) -> CriLogFile:
        self.file = CriLogFile(self.path, streams, on_change=self.notify)
        return self.file

    def notify(self) -> None:
        if self.file is not None and self.file.open_streams == 0:
            self.file = None
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> None:
        ev = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ev.wait(), timeout)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Pump:
    """Reads fds on the event loop and feeds the log file; calls ``on_done`` at EOF of all."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sink: LogSink, on_done: Callable[[], None]
    ) -> None:
        self.loop = loop
        self.sink = sink
        self.on_done = on_done
        self.fds: dict[int, str] = {}
        self.done = asyncio.Event()
        self.io: ContainerIO | None = None  # attach sessions to copy output to

    def add(self, fd: int, stream: str) -> None:
        os.set_blocking(fd, False)
        self.fds[fd] = stream
        self.loop.add_reader(fd, self._readable, fd)

    def _readable(self, fd: int) -> None:
        stream = self.fds[fd]
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            # EIO: a pty master whose slave side is closed everywhere: that is EOF
            if e.errno != errno.EIO:
                raise
            data = b""
        if data:
            if self.sink.file is not None:
                self.sink.file.write(stream, data)
            if self.io is not None:
                self.io.feed(stream, data)
            return
        self.loop.remove_reader(fd)
        os.close(fd)
        del self.fds[fd]
        if self.sink.file is not None:
            self.sink.file.close_stream(stream)
        if self.io is not None:
            self.io.stream_ended(stream)
        if not self.fds:
            self.done.set()
            self.on_done()

    def close(self) -> None:
        """Stop reading (agent shutdown); what was read is in the file."""
        for fd in list(self.fds):
            self.loop.remove_reader(fd)
            os.close(fd)
        self.fds.clear()
        self.sink.close()


class Stdio:
    """The fds handed to ``crun create`` and those the agent keeps."""

    def __init__(self, tty: bool, stdin: bool = False) -> None:
        self.tty = tty
        self.child_fds: list[int] = []  # closed in the agent after crun create
        self.read_fds: list[tuple[int, str]] = []
        # the container's stdin pipe (non-tty with stdin): crun's end and the agent's
        self.stdin_child: int | None = None
        self.stdin_fd: int | None = None
        self.console_dir: str | None = None
        self.console_sock: socket.socket | None = None
        if tty:
            # a short path: sun_path is 108 bytes, the state dir may be deep
            self.console_dir = tempfile.mkdtemp(prefix="criv-con-")
            self.console_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.console_sock.bind(self.console_path)
            self.console_sock.listen(1)
            self.console_sock.setblocking(False)
        else:
            for stream in ("stdout", "stderr"):
                r, w = os.pipe()
                self.child_fds.append(w)
                self.read_fds.append((r, stream))
            if stdin:
                self.stdin_child, self.stdin_fd = os.pipe()

    @property
    def console_path(self) -> str:
        assert self.console_dir is not None
        return os.path.join(self.console_dir, "console.sock")

    @property
    def streams(self) -> tuple[str, ...]:
        return ("stdout",) if self.tty else ("stdout", "stderr")

    async def receive_console(self, timeout: float) -> None:
        """Accept crun's connection and take the pty master it sends."""
        assert self.console_sock is not None
        loop = asyncio.get_running_loop()
        conn, _ = await asyncio.wait_for(loop.sock_accept(self.console_sock), timeout)
        with conn:
            conn.setblocking(True)
            _, fds, _, _ = await asyncio.to_thread(socket.recv_fds, conn, 4096, 1)
        if not fds:
            raise OSError("crun sent no console fd")
        self.read_fds.append((fds[0], "stdout"))

    def close_child_side(self) -> None:
        for fd in self.child_fds:
            os.close(fd)
        self.child_fds.clear()
        if self.stdin_child is not None:
            os.close(self.stdin_child)
            self.stdin_child = None
        if self.console_sock is not None:
            self.console_sock.close()
            self.console_sock = None
        if self.console_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.console_path)
            os.rmdir(self.console_dir)
            self.console_dir = None

    def close_all(self) -> None:
        self.close_child_side()
        for fd, _ in self.read_fds:
            os.close(fd)
        self.read_fds.clear()
        if self.stdin_fd is not None:
            os.close(self.stdin_fd)
            self.stdin_fd = None
