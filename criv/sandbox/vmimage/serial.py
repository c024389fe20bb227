"""Attach to a vm-image container: its VM's serial console, interactively.

The domain's serial port is a pty that libvirt opened for QEMU (``<serial type='pty'>``,
logged through virtlogd: :class:`criv.hypervisor.domain.SerialLog`). An attach opens the
host side of that pty (raw mode, no controlling terminal): what the guest writes comes
out as the session's STDOUT, what the client types goes in as the guest's serial input.
The console log does not depend on it: QEMU logs every byte it writes to the port whether
or not the pty is open, so the CRI log (:mod:`.console`) sees the session's output too.

One open of the pty per VM (:class:`SerialConsole`), shared by every attach session of
the pod: one reader fans the output out; a session more than :data:`MAX_BEHIND` bytes
behind loses output (never stalls the guest, whose console the log also needs). The pty
is closed when the last session leaves or the VM stops (QEMU then drops, but still logs,
what the guest writes). Frames are the agent's STDIO frames (``criv_agent.execframes``):
STDIN in; STDOUT out, CLOSE 1/2 and EXIT (the container's exit code) when the VM stopped;
RESIZE and stdin's CLOSE are ignored (a serial line has no window size; the console stays).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import tty
from collections.abc import Callable

from criv.errors import FailedPrecondition
from criv_agent import execframes as fr

log = logging.getLogger("criv.sandbox.vmimage")

CHUNK = 64 * 1024
MAX_BEHIND = 1 << 20
WRITE_CHUNK = 4096
WRITE_STALL = 10.0  # seconds a full pty may refuse input before the write is dropped


class _Session:
    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._ended = False
        self._ready = asyncio.Event()
        self.dropped = 0

    def put(self, data: bytes) -> None:
        if self._size + len(data) > MAX_BEHIND:
            self.dropped += len(data)
            return
        self._chunks.append(data)
        self._size += len(data)
        self._ready.set()

    def end(self) -> None:
        self._ended = True
        self._ready.set()

    async def read(self) -> bytes:
        """What the guest wrote since the last read; b"" once the console ended."""
        while not self._chunks:
            if self._ended:
                return b""
            self._ready.clear()
            await self._ready.wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return data


class SerialConsole:
    """The VM's console pty at ``path``, open while sessions are attached."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._sessions: set[_Session] = set()
        self._loop = asyncio.get_running_loop()
        self.closed = False

    def open(self) -> None:
        """Open the pty (blocking but quick: a tty open)."""
        fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not os.isatty(fd):
                raise FailedPrecondition(f"the VM's console {self.path} is not a terminal")
            tty.setraw(fd)  # QEMU made it raw; a cooked one would echo guest output back
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._loop.add_reader(fd, self._readable)

    def join(self) -> _Session:
        s = _Session()
        self._sessions.add(s)
        return s

    def leave(self, s: _Session) -> None:
        self._sessions.discard(s)
        if s.dropped:
            log.info("console %s: a slow attach session lost %d bytes", self.path, s.dropped)
        if not self._sessions:
            self.close()

    def close(self) -> None:
        """The VM stopped, or nobody is attached: release the pty; sessions end."""
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        self.closed = True
        for s in self._sessions:
            s.end()

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, CHUNK)
        except BlockingIOError:
            return
        except OSError as e:  # EIO: QEMU closed its side (the VM stopped)
            if e.errno != errno.EIO:
                log.info("console %s: %s", self.path, e)
            data = b""
        if not data:
            self.close()
            return
        for s in self._sessions:
            s.put(data)

    async def write(self, data: bytes) -> None:
        """Type ``data`` on the console; a guest that reads nothing for WRITE_STALL
        seconds loses the rest."""
        stall = 0.0
        while data and self._fd >= 0:
            try:
                n = os.write(self._fd, data[:WRITE_CHUNK])
            except BlockingIOError:
                if stall >= WRITE_STALL:
                    log.info("console %s: guest not reading; input dropped", self.path)
                    return
                await asyncio.sleep(0.02)
                stall += 0.02
                continue
            except OSError:
                return
            data, stall = data[n:], 0.0


async def run_attach(
    console: SerialConsole | None,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    exit_code: Callable[[], int],
) -> None:
    """One attach session on the STDIO data stream, until the VM stops (then CLOSE and
    EXIT) or the client goes away. No console (the VM stopped, its pty could not be
    opened): the session ends at once."""
    if console is None:
        writer.write(fr.close_frame(fr.STDOUT) + fr.close_frame(fr.STDERR))
        writer.write(fr.exit_frame(exit_code()))
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
        return
    session = console.join()
    inbound = asyncio.ensure_future(_in(console, session, reader))
    try:
        while data := await session.read():
            for i in range(0, len(data), fr.MAX_FRAME):
                writer.write(fr.frame(fr.STDOUT, data[i : i + fr.MAX_FRAME]))
            await writer.drain()
        if not inbound.done():  # the console ended, not the client
            writer.write(fr.close_frame(fr.STDOUT) + fr.close_frame(fr.STDERR))
            writer.write(fr.exit_frame(exit_code()))
            await writer.drain()
    except (ConnectionError, OSError) as e:
        log.debug("attach stream ended: %s", e)
    finally:
        inbound.cancel()
        with contextlib.suppress(BaseException):
            await inbound
        console.leave(session)


async def _in(console: SerialConsole, session: _Session, reader: asyncio.StreamReader) -> None:
    try:
        while True:
            kind, payload = await fr.read_frame(reader)
            if kind == fr.STDIN:
                await console.write(payload)
    except (asyncio.IncompleteReadError, ConnectionError, fr.FrameTooLarge):
        session.end()  # the client went away (or sent garbage): this session ends
