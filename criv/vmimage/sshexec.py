"""ExecSync over SSH: one command run to its end on a thread, with a deadline.

At the deadline (or when the caller is cancelled) the channel is closed and the command
killed: a ``signal`` request, then by its marker (:func:`criv.vmimage.sshcommand.kill_marked`).
Output is bounded: each stream keeps ``limit`` bytes and reads and drops the rest.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import paramiko
from paramiko.channel import Channel

from criv.errors import SSHUnavailable
from criv.vmimage.sshcommand import exit_code, kill_marked, marked, send_signal
from criv.vmimage.sshconn import CHUNK, SSHConnection, close_quietly

DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024  # per stream, as the agent's ExecSync


class ExecResult(NamedTuple):
    stdout: bytes
    stderr: bytes
    exit_code: int | None  # None only when timed_out
    timed_out: bool
    truncated: bool  # stdout or stderr went past output_limit (the rest was dropped)


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


class ExecCall:
    """One ExecSync: runs on a thread; ``cancel`` (any thread) closes its channel."""

    def __init__(
        self, conn: SSHConnection, line: str, timeout: float | None, stdin: bytes | None, limit: int
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
