"""Interactive exec (CRI Exec): ``StartExec`` registers the command, the STDIO data
stream naming its exec_id runs it and carries its stdio in frames (execframes.py).

The process starts when the stream arrives (nothing can be lost before the host reads),
so a StartExec whose stream never comes within 30 s is simply forgotten. The host
closing the connection early kills the exec'd process. The process runs as the
container's own (execprocess.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import tempfile
import termios
import time
import uuid
from dataclasses import dataclass, field

from criv_agent.crun import Crun
from criv_agent.errors import InvalidArgument
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
from criv_agent.execprocess import write_exec_process
from criv_agent.execsync import kill_exec
from criv_agent.stdio import Stdio

log = logging.getLogger(__name__)

PENDING_TTL = 30.0
# Output goes out as soon as it is read, but after a short read the pump pauses briefly so
# that a fast producer fills the (enlarged) pipe: each chunk costs a trip through the event
# loop and the vsock, which in a TCG guest is a fraction of a millisecond, and without the
# pause the agent woke for nearly every write of the process (`cat` of 100 MiB in a VM:
# 2.8 s before, 1.5 s with it). An interactive process's next output waits at most the pause.
_CHUNK = 256 * 1024
_PIPE_SIZE = 1 << 20
_BATCH_PAUSE = 0.002
_LATE_CONSOLE = 5.0  # how long a finished crun exec's pty may take to arrive


@dataclass
class PendingExec:
    container_id: str
    cmd: list[str]
    tty: bool
    stdin: bool
    bundle: str
    workdir: str
    created: float = field(default_factory=time.monotonic)


class ExecRegistry:
    def __init__(self, crun: Crun) -> None:
        self.crun = crun
        self._pending: dict[str, PendingExec] = {}

    def add(
        self, container_id: str, cmd: list[str], tty: bool, stdin: bool, bundle: str, workdir: str
    ) -> str:
        if not cmd:
            raise InvalidArgument("empty command")
        self._expire()
        exec_id = uuid.uuid4().hex
        self._pending[exec_id] = PendingExec(container_id, cmd, tty, stdin, bundle, workdir)
        return exec_id

    def take(self, exec_id: str) -> PendingExec | None:
        self._expire()
        return self._pending.pop(exec_id, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for k in [k for k, p in self._pending.items() if now - p.created > PENDING_TTL]:
            del self._pending[k]

    async def run(
        self, ex: PendingExec, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Run the process and shuttle frames until it exited and its output was sent."""
        procfile = await asyncio.to_thread(
            write_exec_process, ex.bundle, ex.workdir, ex.cmd, ex.tty
        )
        try:
            await self._run(ex, procfile, reader, writer)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(procfile)

    async def _run(
        self,
        ex: PendingExec,
        procfile: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        stdio = Stdio(ex.tty)
        fd, pidfile = tempfile.mkstemp(prefix="exec-", suffix=".pid", dir=ex.workdir)
        os.close(fd)
        args = ["exec", "--process", procfile, "--pid-file", pidfile]
        stdin_w: int | None = None
        stdin_r: int | None = None
        if ex.tty:
            args += ["--console-socket", stdio.console_path]
        elif ex.stdin:
            stdin_r, stdin_w = os.pipe()
        proc = await self.crun.spawn(
            [*args, ex.container_id],
            stdin=stdin_r if stdin_r is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL if ex.tty else stdio.child_fds[0],
            stderr=asyncio.subprocess.DEVNULL if ex.tty else stdio.child_fds[1],
        )
        if stdin_r is not None:
            os.close(stdin_r)
        try:
            if ex.tty:
                # crun failing before it sends the pty must not leave us waiting 30 s
                console = asyncio.ensure_future(stdio.receive_console(30))
                early = asyncio.ensure_future(proc.wait())
                await asyncio.wait([console, early], return_when=asyncio.FIRST_COMPLETED)
                if not console.done():
                    # a quick command may be over (and crun gone) before the pty it sent
                    # is received: the pty still holds its output
                    await asyncio.wait([console], timeout=_LATE_CONSOLE)
                if not console.done():
                    console.cancel()
                    code = proc.returncode if proc.returncode is not None else 1
                    writer.write(exit_frame(code))
                    await writer.drain()
                    return
                early.cancel()
                console.result()
            stdio.close_child_side()
            master = stdio.read_fds[0][0] if ex.tty else None
            if ex.tty and ex.stdin:
                stdin_w = os.dup(master)  # type: ignore[arg-type]
            outputs = [
                asyncio.ensure_future(_pump_out(fd, STDOUT if s == "stdout" else STDERR, writer))
                for fd, s in stdio.read_fds
            ]
            inputs = asyncio.ensure_future(_pump_in(reader, stdin_w, master, ex.tty))
            waiter = asyncio.ensure_future(proc.wait())
            done, _ = await asyncio.wait([waiter, inputs], return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done and inputs.result() == "gone":
                log.debug("exec in %s: the host hung up, killing it", ex.container_id)
                await kill_exec(pidfile, proc)
                await waiter
            code = proc.returncode if proc.returncode is not None else -1
            if code < 0:
                code = 128 - code
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*outputs), 2)
            writer.write(exit_frame(code))
            await writer.drain()
            inputs.cancel()
        finally:
            if proc.returncode is None:
                await kill_exec(pidfile, proc)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            stdio.close_all()
            if stdin_w is not None:
                with contextlib.suppress(OSError):
                    os.close(stdin_w)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pidfile)


async def _pump_out(fd: int, kind: int, writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    with contextlib.suppress(OSError):  # a pty master has no pipe size
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    try:
        while True:
            try:
                data = os.read(fd, _CHUNK)
            except BlockingIOError:
                readable.clear()
                await readable.wait()
                continue
            except OSError:  # EIO from a pty master once the slave side is gone
                data = b""
            if not data:
                writer.write(close_frame(kind))
                await writer.drain()
                return
            writer.write(frame(kind, data))
            await writer.drain()
            if len(data) < _CHUNK:
                await asyncio.sleep(_BATCH_PAUSE)
    finally:
        loop.remove_reader(fd)


async def _pump_in(
    reader: asyncio.StreamReader, stdin: int | None, master: int | None, tty: bool
) -> str:
    """Host frames to the process; returns "gone" if the host hung up."""
    while True:
        try:
            kind, payload = await read_frame(reader)
        except (asyncio.IncompleteReadError, ConnectionError, FrameTooLarge):
            return "gone"
        if kind == STDIN and stdin is not None:
            await asyncio.to_thread(_write_all, stdin, payload)
        elif kind == CLOSE and payload[:1] == bytes([STDIN]) and stdin is not None:
            if tty:
                await asyncio.to_thread(_write_all, stdin, b"\x04")  # EOF on a terminal
            else:
                os.close(stdin)
                stdin = None
        elif kind == RESIZE and master is not None and (size := parse_resize(payload)) is not None:
            width, height = size
            winsize = struct.pack("HHHH", height, width, 0, 0)
            with contextlib.suppress(OSError):
                fcntl.ioctl(master, termios.TIOCSWINSZ, winsize)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    with contextlib.suppress(OSError):
        while view:
            view = view[os.write(fd, view) :]
