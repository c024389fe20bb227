"""SSH sessions to `vm-image` guests: ExecSync, and interactive streams for Exec/Attach.

One :class:`SSHClient` per pod holds one SSH connection (made on first use, remade when
it drops) and opens a channel per command. The guest is untrusted: the connection
offers only the pinned host key's algorithms and refuses any other key
(:class:`~criv.errors.HostKeyMismatch`), everything read from the guest is bounded
(banner and packets in :mod:`criv.vmimage.sshwire`, output in :mod:`.sshexec` and
:mod:`.sshstream`), and every wait has a deadline or is released by closing the channel.
paramiko blocks: it runs on threads of its own (never the default executor, which a hung
guest could fill), behind coroutines (:mod:`.sshthreads`).

The layer's modules: :mod:`.sshconn` (the target and its connection), :mod:`.sshcommand`
(quoting, the kill marker, exit codes), :mod:`.sshexec` (ExecSync), :mod:`.sshstream`
(interactive sessions), and this one, the client the event loop uses.

Commands are argv lists, quoted for the remote shell with :func:`shlex.join`, so an
argument is never parsed as shell syntax, and run as ``CRIV_EXEC_ID=<random>; export
CRIV_EXEC_ID; exec <command>`` so that one criv gives up on (timeout, cancel, closed
stream) is found and killed with everything it started
(:func:`~criv.vmimage.sshcommand.kill_marked`; the remote login shell must be
POSIX-like). Exit codes: the command's status, 128+N for a command killed by signal N
(the server's ``exit-signal``), a clear SSHUnavailable for a session that ended without
either.
"""

from __future__ import annotations

import asyncio
import secrets
import threading

import paramiko
from paramiko.channel import Channel

from criv.errors import InvalidArgument, SSHUnavailable
from criv.vmimage.sshcommand import command_line, kill_marked, marked
from criv.vmimage.sshconn import SSHConnection, SSHTarget
from criv.vmimage.sshexec import DEFAULT_OUTPUT_LIMIT, ExecCall, ExecResult
from criv.vmimage.sshstream import SSHStream, check_size
from criv.vmimage.sshthreads import in_thread


def _close_later(conn: SSHConnection, chans: list[Channel]) -> None:
    """Release channels off the event loop (a close sends, and a guest may not read)."""
    for chan in chans:
        threading.Thread(
            target=conn.release, args=(chan,), name="criv-ssh-close", daemon=True
        ).start()


class SSHClient:
    """A pod's SSH endpoint, for the event loop. See the module docstring."""

    def __init__(self, target: SSHTarget) -> None:
        self.target = target
        self._conn = SSHConnection(target)

    async def connect(self) -> None:
        """Connect now (else the first command does): SSHUnavailable within the
        connect timeout, HostKeyMismatch for a key that is not the pin."""
        await in_thread(self._conn.connect_now, "criv-ssh-connect")

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
        call = ExecCall(self._conn, command_line(cmd), timeout, stdin, output_limit)
        try:
            return await in_thread(call.run, "criv-ssh-exec")
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
        check_size(width, height)
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
                return await in_thread(start, "criv-ssh-open")
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
        await in_thread(self._conn.close, "criv-ssh-close")
