"""Interactive SSH sessions (CRI Exec/Attach): a channel's streams joined to the loop.

Each output stream is read on a thread of its own, ``STREAM_CREDITS`` chunks ahead at
most, so a slow reader slows the command down (flow control) and never drops output;
stdin is written by one more thread, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable

import paramiko
from paramiko.channel import Channel

from criv.errors import InvalidArgument, SSHUnavailable
from criv.vmimage.sshcommand import SIGNALS, exit_code, send_signal
from criv.vmimage.sshconn import CHUNK, close_quietly
from criv.vmimage.sshthreads import in_thread, post, set_exception, set_result
from criv.vmimage.sshwire import exit_signal

STREAM_CREDITS = 8  # chunks read ahead per stream of an interactive session


def check_size(width: int, height: int) -> None:
    if not (0 < width <= 65535 and 0 < height <= 65535):
        raise InvalidArgument(f"terminal size {width}x{height} out of range")


class _Pump:
    """Reads one stream of a channel on a thread into the loop, ``STREAM_CREDITS``
    chunks ahead at most (then the window closes and the server waits)."""

    _EOF = b""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, recv: Callable[[int], bytes], name: str
    ) -> None:
        self._loop = loop
        self._recv = recv
        self._q: asyncio.Queue[bytes] = asyncio.Queue()
        self._credits = threading.Semaphore(STREAM_CREDITS)
        self._closed = False
        self._eof = False
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while True:
            self._credits.acquire()
            if self._closed:
                return
            try:
                data = self._recv(CHUNK)
            except (OSError, EOFError, paramiko.SSHException):
                data = self._EOF
            post(self._loop, self._q.put_nowait, data)
            if not data:
                return

    async def read(self) -> bytes:
        if self._eof:
            return b""
        data = await self._q.get()
        self._credits.release()
        if not data:
            self._eof = True
        return data

    def close(self) -> None:
        """On the loop: readers get EOF, the thread stops (the channel's close ends a
        recv it is blocked in)."""
        self._closed = True
        self._credits.release(STREAM_CREDITS + 1)
        self._q.put_nowait(self._EOF)


_Write = tuple[bytes | None, "asyncio.Future[None]"]  # None: close stdin


class SSHStream:
    """An interactive command (CRI Exec/Attach). With a tty, the terminal's output is
    all on stdout (``read_stderr`` gives EOF at once). Reads give b"" at EOF; a slow
    reader slows the command down (flow control), it never drops output."""

    def __init__(
        self,
        chan: Channel,
        tty: bool,
        where: str,
        loop: asyncio.AbstractEventLoop,
        kill: Callable[[], None] = lambda: None,
        release: Callable[[Channel], None] = close_quietly,
    ) -> None:
        self.tty = tty
        self._kill = kill
        self._release = release
        self._chan = chan
        self._where = where
        self._loop = loop
        self._stdout = _Pump(loop, chan.recv, "criv-ssh-stdout")
        self._stderr = None if tty else _Pump(loop, chan.recv_stderr, "criv-ssh-stderr")
        self._writes: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._done: asyncio.Future[None] = loop.create_future()
        self._closed = False
        threading.Thread(target=self._writer, name="criv-ssh-stdin", daemon=True).start()
        threading.Thread(target=self._waiter, name="criv-ssh-status", daemon=True).start()

    def _waiter(self) -> None:
        self._chan.status_event.wait()
        post(self._loop, set_result, self._done, None)

    def _writer(self) -> None:
        while True:
            item = self._writes.get()
            if item is None:
                self._fail_pending()
                return
            data, fut = item
            try:
                if data is None:
                    self._chan.shutdown_write()
                else:
                    self._chan.sendall(data)
            except (OSError, EOFError, paramiko.SSHException) as e:
                err = SSHUnavailable(f"ssh {self._where}: stdin: {e or 'channel closed'}")
                post(self._loop, set_exception, fut, err)
            else:
                post(self._loop, set_result, fut, None)

    def _fail_pending(self) -> None:
        err = SSHUnavailable(f"ssh {self._where}: stdin: the session is closed")
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._writes.get_nowait()
                if item is not None:
                    post(self._loop, set_exception, item[1], err)

    async def _write(self, data: bytes | None) -> None:
        if self._closed:
            raise SSHUnavailable(f"ssh {self._where}: stdin: the session is closed")
        fut: asyncio.Future[None] = self._loop.create_future()
        self._writes.put((data, fut))
        await fut

    async def write_stdin(self, data: bytes) -> None:
        """Send ``data``; returns when the channel took it (waits while the window is
        full)."""
        if data:
            await self._write(data)

    async def close_stdin(self) -> None:
        await self._write(None)

    async def read_stdout(self) -> bytes:
        return await self._stdout.read()

    async def read_stderr(self) -> bytes:
        return b"" if self._stderr is None else await self._stderr.read()

    async def resize(self, width: int, height: int) -> None:
        """Change the PTY's window size (a no-op without a tty)."""
        if not self.tty:
            return
        check_size(width, height)
        chan = self._chan
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            await asyncio.wait_for(
                in_thread(lambda: chan.resize_pty(width=width, height=height), "criv-ssh-tty"),
                10,
            )

    async def signal(self, name: str) -> None:
        """Send a signal ("TERM", "KILL"...) to the command (where the server allows)."""
        if name not in SIGNALS:
            raise InvalidArgument(f"signal {name!r}: not one of {', '.join(SIGNALS)}")
        chan = self._chan
        await in_thread(lambda: send_signal(chan, name), "criv-ssh-signal")

    async def wait(self) -> int:
        """The exit code once the command ends; SSHUnavailable when the session ended
        without one (connection lost, or closed here)."""
        await asyncio.shield(self._done)
        return exit_code(self._chan, self._where)

    @property
    def exited(self) -> bool:
        return self._done.done()

    async def close(self) -> None:
        """Close the channel; a command still running is killed (a tty's is hung up,
        the rest found by the marker); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._writes.put(None)
        self._stdout.close()
        if self._stderr is not None:
            self._stderr.close()
        chan = self._chan
        ended = exit_signal(chan) is not None or chan.exit_status != -1
        await in_thread(lambda: self._release(chan), "criv-ssh-close")
        if not ended:
            await in_thread(self._kill, "criv-ssh-kill")
