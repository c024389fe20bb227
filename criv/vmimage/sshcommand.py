"""A command on a pod's SSH connection: how it is written, killed and how it ended.

Commands are argv lists, quoted for the remote shell with :func:`shlex.join`, so an
argument is never parsed as shell syntax, and run as ``CRIV_EXEC_ID=<random>; export
CRIV_EXEC_ID; exec <command>`` so that one criv gives up on (timeout, cancel, closed
stream) is found and killed with everything it started (:func:`kill_marked`; the remote
login shell must be POSIX-like). Exit codes: the command's status, 128+N for a command
killed by signal N (the server's ``exit-signal``), a clear SSHUnavailable for a session
that ended without either.
"""

from __future__ import annotations

import contextlib
import shlex
import threading

import paramiko
from paramiko.channel import Channel
from paramiko.message import Message

from criv.errors import InvalidArgument, SSHUnavailable
from criv.vmimage.sshconn import SSHConnection, close_quietly
from criv.vmimage.sshwire import exit_signal

MAX_COMMAND = 128 * 1024
# Linux signal numbers by the names RFC 4254 6.10 uses (the guest is Linux).
SIGNALS = {
    "HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "BUS": 7, "FPE": 8,
    "KILL": 9, "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14, "TERM": 15,
}  # fmt: skip
UNKNOWN_SIGNAL_EXIT = 255
# An ExecSync's command carries this variable (a random value per call) so that a
# timed-out one, with everything it started, can be found and killed.
MARKER_VAR = "CRIV_EXEC_ID"
KILL_BY_MARKER = (
    'for p in /proc/[0-9]*; do tr "\\000" "\\n" 2>/dev/null <"$p/environ"'
    ' | grep -qx "{marker}" && kill -KILL "${{p#/proc/}}" 2>/dev/null; done; true'
)
KILL_TIMEOUT = 5.0


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


def kill_marked(conn: SSHConnection, marker: str) -> None:
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
