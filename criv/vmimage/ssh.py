"""SSH sessions to `vm-image` guests: ExecSync, and interactive streams for Exec/Attach.

One :class:`SSHClient` per pod holds one SSH connection (made on first use, remade when
it drops) and opens a channel per command. The guest is untrusted: the connection
offers only the pinned host key's algorithms and refuses any other key
(:class:`~criv.errors.HostKeyMismatch`), everything read from the guest is bounded
(banner and packets in :mod:`criv.vmimage.sshwire`, output here), and every wait has a
deadline or is released by closing the channel. paramiko blocks: it runs on threads of
its own (never the default executor, which a hung guest could fill), behind coroutines.

Commands are argv lists, quoted for the remote shell with :func:`shlex.join`, so an
argument is never parsed as shell syntax, and run as ``CRIV_EXEC_ID=<random>; export
CRIV_EXEC_ID; exec <command>`` so that one criv gives up on (timeout, cancel, closed
stream) is found and killed with everything it started (:func:`kill_marked`; the remote
login shell must be POSIX-like). Exit codes: the command's status, 128+N for a command
killed by signal N (the server's ``exit-signal``), a clear SSHUnavailable for a session
that ended without either.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import secrets
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import paramiko
from paramiko.channel import Channel
from paramiko.message import Message

from criv.errors import InvalidArgument, SSHUnavailable
from criv.vmimage.sshkeys import HostKeyPin
from criv.vmimage.sshwire import connect, exit_signal

T = TypeVar("T")

DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024  # per stream, as the agent's ExecSync
MAX_COMMAND = 128 * 1024
CHUNK = 32 * 1024
STREAM_CREDITS = 8  # chunks read ahead per stream of an interactive session
# Linux signal numbers by the names RFC 4254 6.10 uses (the guest is Linux).
SIGNALS = {
    "HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "BUS": 7, "FPE": 8,
    "KILL": 9, "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14, "TERM": 15,
}  # fmt: skip
UNKNOWN_SIGNAL_EXIT = 255
# Connections being made at once to one pod: dropbear drops a client's sixth
# unauthenticated connection (MAX_UNAUTH_PER_IP 5).
MAX_HANDSHAKES = 4
# An ExecSync's command carries this variable (a random value per call) so that a
# timed-out one, with everything it started, can be found and killed.
MARKER_VAR = "CRIV_EXEC_ID"
KILL_BY_MARKER = (
    'for p in /proc/[0-9]*; do tr "\\000" "\\n" 2>/dev/null <"$p/environ"'
    ' | grep -qx "{marker}" && kill -KILL "${{p#/proc/}}" 2>/dev/null; done; true'
)
KILL_TIMEOUT = 5.0


@dataclass(frozen=True)
class SSHTarget:
    host: str
    port: int
    user: str
    key: paramiko.PKey  # the pod key (sshkeys.PodKey.load())
    pin: HostKeyPin
    connect_timeout: float = 10.0
    netns: Path | None = None  # connect from this network namespace (the pod's)

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


class ExecResult(NamedTuple):
    stdout: bytes
    stderr: bytes
    exit_code: int | None  # None only when timed_out
    timed_out: bool
    truncated: bool  # stdout or stderr went past output_limit (the rest was dropped)


def command_line(cmd: list[str]) -> str:
    """``cmd`` quoted for the remote shell: each argument one word, never syntax."""
    if not cmd or not cmd[0]:
        raise InvalidArgument("exec: empty command")
    if any("\0" in a for a in cmd):
        raise InvalidArgument("exec: a command argument contains a NUL byte")
    line = shlex.join(cmd)
    if len(line.encode()) > MAX_COMMAND:
        raise InvalidArgument(f"exec: command line over {MAX_COMMAND} bytes")
    return line


def exit_code(chan: Channel, where: str) -> int:
    """The command's exit code from what the server sent (see the module docstring)."""
    sig = exit_signal(chan)
    if sig is not None:
        num = SIGNALS.get(sig.removeprefix("SIG"))
        return 128 + num if num is not None else UNKNOWN_SIGNAL_EXIT
    status = chan.exit_status
    if 0 <= status <= 255:
        return status
    if status == -1:
        raise SSHUnavailable(f"ssh {where}: the session ended without an exit status")
    raise SSHUnavailable(f"ssh {where}: the server sent exit status {status} (not 0-255)")


def marked(line: str, marker: str) -> str:
    """``line`` run with ``MARKER_VAR=marker`` in its environment (and its children's)."""
    return f"{MARKER_VAR}={marker}; export {MARKER_VAR}; exec {line}"


def kill_marked(conn: _Connection, marker: str) -> None:
    """Kill every guest process that carries ``marker`` (blocking, bounded).

    OpenSSH refuses ``signal`` requests on root sessions (there is no privilege
    separated child to send them), and closing a session without a tty leaves its
    command running; so a command criv gives up on is found by its marker variable."""
    script = KILL_BY_MARKER.format(marker=f"{MARKER_VAR}={marker}")
    try:
        chan = conn.open_channel()
    except SSHUnavailable:
        return
    guard = threading.Timer(KILL_TIMEOUT, close_quietly, (chan,))  # a guest that never answers
    guard.daemon = True
    guard.start()
    try:
        chan.exec_command(command_line(["sh", "-c", script]))
        chan.shutdown_write()
        chan.status_event.wait(KILL_TIMEOUT)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:
        guard.cancel()
        conn.release(chan)


def close_quietly(chan: Channel) -> None:
    """Close a channel; a connection that already died is no error (the close of a
    channel sends, and runs on threads nobody waits on)."""
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        chan.close()


def send_signal(chan: Channel, name: str) -> None:
    """RFC 4254 6.9 ``signal`` request (OpenSSH >= 7.9, dropbear); no reply asked."""
    if chan.closed or not chan.active:
        return
    m = Message()
    m.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    m.add_int(chan.remote_chanid)
    m.add_string("signal")
    m.add_boolean(False)
    m.add_string(name)
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        chan.transport._send_user_message(m)  # type: ignore[union-attr]


def _drain(recv: Callable[[int], bytes], limit: int) -> tuple[bytes, bool]:
    """Read to EOF; keep ``limit`` bytes, read and drop the rest (the server never
    blocks on a full window)."""
    buf = bytearray()
    truncated = False
    while data := recv(CHUNK):
        room = limit - len(buf)
        if room > 0:
            buf += data[:room]
        if len(data) > room:
            truncated = True
    return bytes(buf), truncated


def one_command_per_connection(server_version: str) -> bool:
    """dropbear 2022.82 to 2024.85 can abort a whole connection when one session's
    command exits while another channel waits for its exec request (mkj/dropbear#321,
    fixed in 2024.86): with those, each command gets a connection of its own."""
    m = re.match(r"SSH-2\.0-dropbear_(\d{4})\.(\d{1,4})", server_version)
    return m is not None and (int(m[1]), int(m[2])) < (2024, 86)


class _Connection:
    """The blocking half: one transport, reconnected on demand (or one per command for
    servers that need it); thread-safe."""

    def __init__(self, target: SSHTarget) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._transport: paramiko.Transport | None = None
        self._dedicated = False  # one connection per command
        self._live: set[paramiko.Transport] = set()  # dedicated ones in use
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._closed = False

    def _connect(self) -> paramiko.Transport:
        t = self.target
        if not self._handshakes.acquire(timeout=t.connect_timeout):
            raise SSHUnavailable(
                f"ssh {t.where}: {MAX_HANDSHAKES} connections still being made after"
                f" {t.connect_timeout:g}s"
            )
        try:
            return connect(t.host, t.port, t.user, t.key, t.pin, t.connect_timeout, t.netns)
        finally:
            self._handshakes.release()

    def _closed_error(self) -> SSHUnavailable:
        return SSHUnavailable(f"ssh {self.target.where}: the client is closed")

    def transport(self) -> tuple[paramiko.Transport, bool]:
        """A transport for one command, and whether it is the command's own (closed by
        :meth:`release`)."""
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if not self._dedicated:
                if self._transport is None or not self._transport.is_active():
                    if self._transport is not None:
                        self._transport.close()
                    self._transport = None
                    self._transport = self._connect()
                    if one_command_per_connection(self._transport.remote_version):
                        self._dedicated = True
                        own, self._transport = self._transport, None
                        self._live.add(own)
                        return own, True
                return self._transport, False
        own = self._connect()
        with self._lock:
            if self._closed:
                own.close()
                raise self._closed_error()
            self._live.add(own)
        return own, True

    def open_channel(self) -> Channel:
        transport, _ = self.transport()
        try:
            return transport.open_session(timeout=self.target.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            transport.close()  # the next call reconnects
            with self._lock:
                self._live.discard(transport)
            raise SSHUnavailable(f"ssh {self.target.where}: cannot open a session: {e}") from e

    def release(self, chan: Channel) -> None:
        """Close a command's channel (and its connection where it had its own)."""
        close_quietly(chan)
        transport = chan.get_transport()
        with self._lock:
            own = transport in self._live
            self._live.discard(transport)
        if own and transport is not None:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                transport.close()

    def connect_now(self) -> None:
        transport, own = self.transport()
        if own:
            with self._lock:
                self._live.discard(transport)
            transport.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            transports = [*self._live, *([self._transport] if self._transport else [])]
            self._live.clear()
            self._transport = None
        for transport in transports:
            transport.close()


class _ExecCall:
    """One ExecSync: runs on a thread; ``cancel`` (any thread) closes its channel."""

    def __init__(
        self, conn: _Connection, line: str, timeout: float | None, stdin: bytes | None, limit: int
    ) -> None:
        self._conn = conn
        self._line = line
        self._timeout = timeout
        self._stdin = stdin
        self._limit = limit
        self._lock = threading.Lock()
        self._chan: Channel | None = None
        self._stopped = False
        self._started = False
        self._marker = secrets.token_hex(8)
        self.timed_out = False

    def _stop(self, timed_out: bool) -> None:
        with self._lock:
            self._stopped = True
            self.timed_out = self.timed_out or timed_out
            chan = self._chan
        if chan is None:
            return
        # the signal goes before the close; a guest that stopped reading its socket
        # holds this thread 2 s at most (the close releases every waiter first)
        kill = threading.Thread(target=send_signal, args=(chan, "KILL"), daemon=True)
        kill.start()
        kill.join(2.0)
        close_quietly(chan)
        if self._started:
            kill_marked(self._conn, self._marker)

    def cancel(self) -> None:
        """From any thread, the event loop's too: the stop runs on a thread."""
        threading.Thread(
            target=self._stop, args=(False,), name="criv-ssh-stop", daemon=True
        ).start()

    def run(self) -> ExecResult:
        where = self._conn.target.where
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        chan = self._conn.open_channel()
        with self._lock:
            self._chan = chan
            stopped = self._stopped
        if stopped or (deadline is not None and time.monotonic() >= deadline):
            self._conn.release(chan)
            return ExecResult(b"", b"", None, True, False)
        timer = None
        if deadline is not None:
            timer = threading.Timer(deadline - time.monotonic(), self._stop, (True,))
            timer.daemon = True
            timer.start()
        try:
            try:
                self._started = True  # from here on, a stop kills by the marker
                chan.exec_command(marked(self._line, self._marker))
            except (paramiko.SSHException, OSError, EOFError) as e:
                if self.timed_out:
                    return ExecResult(b"", b"", None, True, False)
                raise SSHUnavailable(f"ssh {where}: exec refused: {e}") from e
            err: list[tuple[bytes, bool]] = []
            reader = threading.Thread(
                target=lambda: err.append(_drain(chan.recv_stderr, self._limit)),
                name="criv-ssh-stderr",
                daemon=True,
            )
            reader.start()
            if self._stdin:
                threading.Thread(
                    target=_send_and_close, args=(chan, self._stdin), name="criv-ssh-stdin",
                    daemon=True,
                ).start()  # fmt: skip
            else:
                _send_and_close(chan, b"")
            out, out_cut = _drain(chan.recv, self._limit)
            reader.join()
            stderr, err_cut = err[0] if err else (b"", False)
            chan.status_event.wait()  # set by exit-status/-signal, or by the close
            if self.timed_out:
                return ExecResult(out, stderr, None, True, out_cut or err_cut)
            return ExecResult(out, stderr, exit_code(chan, where), False, out_cut or err_cut)
        finally:
            if timer is not None:
                timer.cancel()
            self._conn.release(chan)


def _send_and_close(chan: Channel, data: bytes) -> None:
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        if data:
            chan.sendall(data)
        chan.shutdown_write()


def _check_size(width: int, height: int) -> None:
    if not (0 < width <= 65535 and 0 < height <= 65535):
        raise InvalidArgument(f"terminal size {width}x{height} out of range")


def _close_later(conn: _Connection, chans: list[Channel]) -> None:
    """Release channels off the event loop (a close sends, and a guest may not read)."""
    for chan in chans:
        threading.Thread(
            target=conn.release, args=(chan,), name="criv-ssh-close", daemon=True
        ).start()


async def _in_thread(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on a daemon thread of its own; a caller that is cancelled stops waiting
    (whoever owns what ``fn`` blocks on must release it)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        try:
            result = fn()
        except BaseException as e:
            _post(loop, _set_exception, fut, e)
        else:
            _post(loop, _set_result, fut, result)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await fut


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is gone
        loop.call_soon_threadsafe(fn, *args)


def _set_result(fut: asyncio.Future[T], result: T) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[T], e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)


class SSHClient:
    """A pod's SSH endpoint, for the event loop. See the module docstring."""

    def __init__(self, target: SSHTarget) -> None:
        self.target = target
        self._conn = _Connection(target)

    async def connect(self) -> None:
        """Connect now (else the first command does): SSHUnavailable within the
        connect timeout, HostKeyMismatch for a key that is not the pin."""
        await _in_thread(self._conn.connect_now, "criv-ssh-connect")

    async def exec_sync(
        self,
        cmd: list[str],
        timeout: float | None = None,
        stdin: bytes | None = None,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
    ) -> ExecResult:
        """Run ``cmd`` to its end. ``timeout`` (None or <= 0: none) counts from this
        call (a connect is bounded by the connect timeout besides); at the deadline the
        channel is closed and the command killed (``signal`` request, then the marker:
        see :func:`kill_marked`), and ``timed_out`` comes back with the output so far.
        ``stdin`` is sent, then EOF (EOF at once when None). Cancelling the caller
        kills the command the same way."""
        if timeout is not None and timeout <= 0:
            timeout = None  # CRI: 0 is no timeout
        if output_limit < 0:
            raise InvalidArgument(f"exec: output limit {output_limit} < 0")
        call = _ExecCall(self._conn, command_line(cmd), timeout, stdin, output_limit)
        try:
            return await _in_thread(call.run, "criv-ssh-exec")
        except asyncio.CancelledError:
            call.cancel()
            raise

    async def open_stream(
        self,
        cmd: list[str] | None,
        tty: bool = False,
        width: int = 80,
        height: int = 24,
        term: str = "xterm",
    ) -> SSHStream:
        """Start ``cmd`` (None: the user's login shell) for an interactive session."""
        _check_size(width, height)
        marker = secrets.token_hex(8)
        line = None if cmd is None else marked(command_line(cmd), marker)
        holder: list[Channel] = []
        gave_up = threading.Event()

        def start() -> Channel:
            chan = self._conn.open_channel()
            holder.append(chan)
            if gave_up.is_set():
                self._conn.release(chan)
                raise SSHUnavailable(f"ssh {self.target.where}: given up")
            if tty:
                chan.get_pty(term=term, width=width, height=height)
            if line is None:
                chan.invoke_shell()
            else:
                chan.exec_command(line)
            return chan

        async def start_bounded() -> Channel:
            try:
                return await _in_thread(start, "criv-ssh-open")
            except (paramiko.SSHException, OSError, EOFError) as e:
                raise SSHUnavailable(f"ssh {self.target.where}: exec refused: {e}") from e

        try:
            # connecting has its own timeout; the requests get one more connect timeout
            chan = await asyncio.wait_for(start_bounded(), 2 * self.target.connect_timeout)
        except TimeoutError:
            gave_up.set()
            _close_later(self._conn, holder)
            raise SSHUnavailable(
                f"ssh {self.target.where}: the server did not start the command"
            ) from None
        except BaseException:
            gave_up.set()
            _close_later(self._conn, holder)
            raise
        loop = asyncio.get_running_loop()
        conn = self._conn

        def kill() -> None:
            if line is not None:
                kill_marked(conn, marker)

        return SSHStream(chan, tty, self.target.where, loop, kill, conn.release)

    async def close(self) -> None:
        await _in_thread(self._conn.close, "criv-ssh-close")


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
            _post(self._loop, self._q.put_nowait, data)
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
        _post(self._loop, _set_result, self._done, None)

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
                _post(self._loop, _set_exception, fut, err)
            else:
                _post(self._loop, _set_result, fut, None)

    def _fail_pending(self) -> None:
        err = SSHUnavailable(f"ssh {self._where}: stdin: the session is closed")
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._writes.get_nowait()
                if item is not None:
                    _post(self._loop, _set_exception, item[1], err)

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
        _check_size(width, height)
        chan = self._chan
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            await asyncio.wait_for(
                _in_thread(lambda: chan.resize_pty(width=width, height=height), "criv-ssh-tty"),
                10,
            )

    async def signal(self, name: str) -> None:
        """Send a signal ("TERM", "KILL"...) to the command (where the server allows)."""
        if name not in SIGNALS:
            raise InvalidArgument(f"signal {name!r}: not one of {', '.join(SIGNALS)}")
        chan = self._chan
        await _in_thread(lambda: send_signal(chan, name), "criv-ssh-signal")

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
        await _in_thread(lambda: self._release(chan), "criv-ssh-close")
        if not ended:
            await _in_thread(self._kill, "criv-ssh-kill")
