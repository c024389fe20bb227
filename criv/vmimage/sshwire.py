"""paramiko, bounded for a hostile server, and the connect step of criv's SSH layer.

paramiko trusts its peer more than criv may trust a guest: it reads the version banner
until a newline with no size limit, takes a packet length from the wire as is, lets a
channel's buffer grow past the window the server was given, and drops ``exit-signal``
(a command killed by a signal then has no exit status at all). The subclasses here:

- bound the banner (all lines before ``SSH-``) to ``MAX_BANNER`` bytes and every packet
  to ``MAX_PACKET`` bytes;
- close the connection when a server sends a channel more than its window
  (``WINDOW`` + a packet) of unread data;
- record ``exit-signal`` on the channel (:func:`exit_signal`).

:func:`connect` opens a TCP connection, runs the key exchange offering only the pinned
host key's algorithms, checks the key against the pin before authenticating, and logs
in with the pod key, all within one connect timeout.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import paramiko
from paramiko.channel import Channel
from paramiko.common import MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA, MSG_CHANNEL_REQUEST
from paramiko.message import Message
from paramiko.packet import Packetizer

from criv.errors import CrivError, SSHUnavailable
from criv.vmimage.sshkeys import HostKeyPin

MAX_BANNER = 64 * 1024
MAX_PACKET = 256 * 1024
WINDOW = 1 << 20
MAX_PACKET_DATA = 32 * 1024
MAX_SIGNAL_NAME = 32
KEEPALIVE = 15

_HOSTKEY_ALGORITHMS = {
    "ssh-ed25519": ("ssh-ed25519",),
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
}

_SIGNAL_ATTR = "_criv_exit_signal"


class _BoundedPacketizer(Packetizer):
    def __init__(self, sock: Any) -> None:
        super().__init__(sock)
        self._banner_bytes = 0

    def _read_timeout(self, timeout: float) -> bytes:
        # Only readline (the banner exchange) calls this, <= 128 bytes a time.
        data: bytes = getattr(super(), "_read_timeout")(timeout)  # noqa: B009
        self._banner_bytes += len(data)
        if self._banner_bytes > MAX_BANNER:
            raise paramiko.SSHException(f"server banner over {MAX_BANNER} bytes")
        return data

    def read_all(self, n: int, check_rekey: bool = False) -> bytes:
        if n > MAX_PACKET:
            raise paramiko.SSHException(f"server sent a {n} byte packet (over {MAX_PACKET})")
        return super().read_all(n, check_rekey)


_Handler = Callable[[Channel, Message], None]
_base_handlers = cast(dict[int, _Handler], getattr(paramiko.Transport, "_channel_handler_table"))  # noqa: B009


def _bounded(handler: _Handler) -> _Handler:
    def feed(chan: Channel, m: Message) -> None:
        unread = len(chan.in_buffer) + len(chan.in_stderr_buffer)
        if unread > WINDOW + 2 * MAX_PACKET_DATA:
            raise paramiko.SSHException(
                f"server sent past the channel window ({unread} bytes unread)"
            )
        handler(chan, m)

    return feed


def _handle_request(chan: Channel, m: Message) -> None:
    pos = m.packet.tell()
    if m.get_text() != "exit-signal":
        m.packet.seek(pos)
        _base_handlers[MSG_CHANNEL_REQUEST](chan, m)
        return
    m.get_boolean()  # want_reply: false for exit-signal (RFC 4254 6.10)
    name = m.get_text()[:MAX_SIGNAL_NAME]
    setattr(chan, _SIGNAL_ATTR, name)
    chan.status_event.set()


class BoundedTransport(paramiko.Transport):
    _channel_handler_table = {
        **_base_handlers,
        MSG_CHANNEL_DATA: _bounded(_base_handlers[MSG_CHANNEL_DATA]),
        MSG_CHANNEL_EXTENDED_DATA: _bounded(_base_handlers[MSG_CHANNEL_EXTENDED_DATA]),
        MSG_CHANNEL_REQUEST: _handle_request,
    }


def exit_signal(chan: Channel) -> str | None:
    """The signal name of an ``exit-signal`` the server sent for ``chan`` ("KILL")."""
    name = getattr(chan, _SIGNAL_ATTR, None)
    return name if isinstance(name, str) else None


def connect(
    host: str,
    port: int,
    user: str,
    key: paramiko.PKey,
    pin: HostKeyPin,
    timeout: float,
    netns: Path | None = None,
) -> paramiko.Transport:
    """A logged-in transport to ``host:port``, or SSHUnavailable (HostKeyMismatch for a
    key that is not the pin) within ``timeout`` seconds. ``netns``: connect from that
    network namespace (a pod's, where the VM's address is)."""
    where = f"{host}:{port}" + (f" (netns {netns})" if netns else "")
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.1, deadline - time.monotonic())

    try:
        if netns is None:
            sock = socket.create_connection((host, port), timeout=timeout)
        else:
            sock = connect_in_netns(netns, host, port, timeout)
    except OSError as e:
        raise SSHUnavailable(f"ssh {where}: cannot connect within {timeout:g}s: {e}") from e
    transport: paramiko.Transport | None = None
    try:
        sock.settimeout(None)
        transport = BoundedTransport(
            sock,
            default_window_size=WINDOW,
            default_max_packet_size=MAX_PACKET_DATA,
            packetizer_class=_BoundedPacketizer,
        )
        transport.get_security_options().key_types = _HOSTKEY_ALGORITHMS[pin.key_type]
        transport.banner_timeout = left()
        transport.handshake_timeout = left()
        transport.start_client(timeout=left())
        pin.check(transport.get_remote_server_key(), where)
        transport.auth_timeout = left()
        transport.auth_publickey(user, key)
        if not transport.is_authenticated():
            raise paramiko.AuthenticationException("not authenticated")
        transport.set_keepalive(KEEPALIVE)  # a VM that vanished is noticed
        return transport
    except CrivError:
        _close(transport, sock)
        raise
    except paramiko.AuthenticationException as e:
        _close(transport, sock)
        raise SSHUnavailable(f"ssh {user}@{where}: the pod key was refused ({e})") from e
    except (paramiko.SSHException, OSError, EOFError) as e:
        _close(transport, sock)
        if time.monotonic() >= deadline:
            raise SSHUnavailable(f"ssh {where}: no SSH session within {timeout:g}s ({e})") from e
        raise SSHUnavailable(f"ssh {where}: {type(e).__name__}: {e}") from e


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)  # os.setns is Python 3.12+


def connect_in_netns(netns: Path, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection made from network namespace ``netns`` (a socket keeps the
    namespace it was made in). The setns happens on a throwaway thread, so no thread
    of criv's ever changes namespace."""
    result: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(socket.create_connection((host, port), timeout=timeout))
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=work, name="criv-ssh-netns", daemon=True)
    t.start()
    t.join(timeout + 5)
    if not result:
        raise TimeoutError(f"no connection within {timeout:g}s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _close(transport: paramiko.Transport | None, sock: socket.socket) -> None:
    if transport is not None:
        transport.close()
    sock.close()
