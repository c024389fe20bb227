"""LocalProcessBackend: runs exec'd processes on this host, dials 127.0.0.1 for ports.

A test and development backend for the protocol layer: it exercises the streaming server
with real processes, pipes, ptys and sockets, but no sandbox. Pods never use it; they go
through the agent backend. "Containers" for attach are processes registered with
:meth:`LocalProcessBackend.create_container`.

Policy here: a session whose client goes away kills its exec'd process (its process
group), so nothing outlives a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import pty
import signal
import struct
import termios
from dataclasses import dataclass, field

from criv.errors import NotFound
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

READ_CHUNK = 64 * 1024


def _exit_code(returncode: int) -> int:
    # asyncio reports a signal death as -N; shells and containerd say 128+N.
    return 128 - returncode if returncode < 0 else returncode


class _PipeWriter:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._w = writer

    async def write(self, data: bytes) -> None:
        await write_drained(self._w, data)

    async def close(self) -> None:
        if not self._w.is_closing():
            self._w.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._w.wait_closed()


class _PtyMaster:
    """Non-blocking reads and writes on a pty master, with EIO (slave closed) as EOF."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._loop = asyncio.get_running_loop()
        self._closed = False

    async def _wait(self, writable: bool) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if writable:
            self._loop.add_writer(self.fd, ready)
        else:
            self._loop.add_reader(self.fd, ready)
        try:
            await fut
        finally:
            if not self._closed:
                if writable:
                    self._loop.remove_writer(self.fd)
                else:
                    self._loop.remove_reader(self.fd)

    async def read(self, n: int) -> bytes:
        while not self._closed:
            try:
                return os.read(self.fd, n)
            except BlockingIOError:
                await self._wait(writable=False)
            except OSError as e:
                if e.errno == errno.EIO:  # every slave fd closed: end of output
                    return b""
                raise
        return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._closed:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                await self._wait(writable=True)
            except OSError:
                return

    async def close(self) -> None:
        # Closing stdin of a terminal means sending the EOF character (^D), as docker does.
        await self.write(b"\x04")

    def resize(self, width: int, height: int) -> None:
        if not self._closed:
            fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._loop.remove_reader(self.fd)
            self._loop.remove_writer(self.fd)
            os.close(self.fd)


def _set_controlling_tty() -> None:  # runs in the child, before exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def _spawn(
    cmd: list[str], tty: bool, stdin: bool
) -> tuple[asyncio.subprocess.Process, _PtyMaster | None]:
    try:
        if tty:
            master, slave = pty.openpty()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *cmd,
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    start_new_session=True,
                    preexec_fn=_set_controlling_tty,
                )
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            return proc, _PtyMaster(master)
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=READ_CHUNK * 4,
        )
        return proc, None
    except OSError as e:
        raise StreamingError(f"cannot start {cmd[0]!r}: {e.strerror}") from e


async def _discard(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while await reader.read(65536):
            pass


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


class _ExecStreams:
    """ProcessStreams of one exec'd process (pipes, or one pty)."""

    def __init__(self, proc: asyncio.subprocess.Process, master: _PtyMaster | None) -> None:
        self._proc = proc
        self._master = master
        self.stdin: ByteWriter | None
        self.stdout: ByteReader | None
        self.stderr: ByteReader | None
        if master is not None:
            self.stdin, self.stdout, self.stderr = master, master, None
        else:
            self.stdin = _PipeWriter(proc.stdin) if proc.stdin else None
            self.stdout, self.stderr = proc.stdout, proc.stderr

    async def resize(self, width: int, height: int) -> None:
        if self._master is not None:
            self._master.resize(width, height)

    async def wait(self) -> int:
        return _exit_code(await self._proc.wait())

    async def close(self) -> None:
        _kill_group(self._proc)
        if self._master is not None:
            self._master.shutdown()
        elif self._proc.stdin is not None:
            self._proc.stdin.close()
        # wait() also waits for the output pipes to close, which a client that stopped
        # reading left full: discard what is left (bounded, for a child that escaped).
        pipes = [p for p in (self._proc.stdout, self._proc.stderr) if p is not None]
        with contextlib.suppress(ProcessLookupError, TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.gather(self._proc.wait(), *map(_discard, pipes))


class _QueueReader:
    """One attach session's copy of a container output stream."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=256)
        self._eof = False

    async def read(self, n: int) -> bytes:
        if self._eof:
            return b""
        data = await self.queue.get()
        if not data:
            self._eof = True
        return data


@dataclass
class _Container:
    id: str
    proc: asyncio.subprocess.Process
    master: _PtyMaster | None
    stdin_once: bool
    subscribers: list[tuple[_QueueReader, _QueueReader | None]] = field(default_factory=list)
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    stdin_closed: bool = False

    @property
    def stdin(self) -> ByteWriter | None:
        if self.stdin_closed:
            return None
        if self.master is not None:
            return self.master
        return _PipeWriter(self.proc.stdin) if self.proc.stdin else None


class _AttachStdin:
    def __init__(self, container: _Container) -> None:
        self._c = container

    async def write(self, data: bytes) -> None:
        w = self._c.stdin
        if w is not None:
            await w.write(data)

    async def close(self) -> None:
        # Only a stdin_once container loses its stdin when one attached client ends it.
        w = self._c.stdin
        if self._c.stdin_once and w is not None:
            self._c.stdin_closed = True
            await w.close()


class _AttachStreams:
    def __init__(self, c: _Container, stdin: bool) -> None:
        self._c = c
        out = _QueueReader()
        err = None if c.master is not None else _QueueReader()
        self._entry = (out, err)
        c.subscribers.append(self._entry)
        self.stdout: ByteReader | None = out
        self.stderr: ByteReader | None = err
        self.stdin: ByteWriter | None = _AttachStdin(c) if stdin and c.stdin else None

    async def resize(self, width: int, height: int) -> None:
        if self._c.master is not None:
            self._c.master.resize(width, height)

    async def wait(self) -> int:
        await asyncio.gather(*self._c.pumps, return_exceptions=True)
        return 0

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self._c.subscribers.remove(self._entry)
        # Unblock a pump that was waiting for room in our (now abandoned) queues.
        for q in self._entry:
            while q is not None and not q.queue.empty():
                q.queue.get_nowait()


class LocalProcessBackend:
    """StreamingBackend on the host. Container and sandbox ids are ignored by exec and
    port-forward; attach needs a container made with :meth:`create_container`."""

    def __init__(self) -> None:
        self._containers: dict[str, _Container] = {}
        self._execs: set[_ExecStreams] = set()

    async def exec(
        self, container_id: str, cmd: list[str], tty: bool, stdin: bool
    ) -> ProcessStreams:
        proc, master = await _spawn(cmd, tty, stdin)
        streams = _ExecStreams(proc, master)
        self._execs.add(streams)
        proc_done = asyncio.ensure_future(proc.wait())
        proc_done.add_done_callback(lambda _: self._execs.discard(streams))
        return streams

    async def create_container(
        self,
        container_id: str,
        cmd: list[str],
        tty: bool = False,
        stdin: bool = False,
        stdin_once: bool = False,
    ) -> None:
        """Start a long-running process that attach sessions can join."""
        proc, master = await _spawn(cmd, tty, stdin)
        c = _Container(container_id, proc, master, stdin_once)
        if master is not None:
            c.pumps.append(asyncio.create_task(self._pump(c, master, 0)))
        else:
            assert proc.stdout is not None and proc.stderr is not None
            c.pumps.append(asyncio.create_task(self._pump(c, proc.stdout, 0)))
            c.pumps.append(asyncio.create_task(self._pump(c, proc.stderr, 1)))
        self._containers[container_id] = c

    @staticmethod
    async def _pump(c: _Container, source: ByteReader, index: int) -> None:
        # Fan the container's output out to every attached session; a session that does
        # not keep up stalls the container, as a blocked pipe would.
        while True:
            data = await source.read(READ_CHUNK)
            for entry in list(c.subscribers):
                q = entry[index]
                if q is not None:
                    await q.queue.put(data)
            if not data:
                return

    async def attach(self, container_id: str, tty: bool, stdin: bool) -> ProcessStreams:
        c = self._containers.get(container_id)
        if c is None:
            raise NotFound(f"container {container_id!r} not found")
        if c.proc.returncode is not None:
            raise StreamingError(f"container {container_id!r} is not running")
        return _AttachStreams(c, stdin)

    async def port_forward(self, sandbox_id: str, port: int) -> DuplexStream:
        last: OSError | None = None
        for host in ("127.0.0.1", "::1"):  # IPv4 first, then IPv6, as the kubelet does
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError as e:
                last = e
                continue
            return SocketDuplex(reader, writer)
        raise PortForwardRefused(f"dial tcp 127.0.0.1:{port}: {last}")

    async def remove_container(self, container_id: str) -> None:
        c = self._containers.pop(container_id, None)
        if c is None:
            return
        _kill_group(c.proc)
        await c.proc.wait()
        for t in c.pumps:
            t.cancel()
        await asyncio.gather(*c.pumps, return_exceptions=True)
        if c.master is not None:
            c.master.shutdown()

    async def close(self) -> None:
        """Kill everything this backend started (test teardown)."""
        for cid in list(self._containers):
            await self.remove_container(cid)
        for s in list(self._execs):
            await s.close()
