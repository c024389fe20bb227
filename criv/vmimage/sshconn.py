"""The blocking half of a pod's SSH endpoint: where it is, and its connection.

One :class:`SSHConnection` per pod holds one SSH connection (made on first use, remade
when it drops) and opens a channel per command; against the dropbear versions of
:func:`one_command_per_connection` each command gets a connection of its own. The
connection offers only the pinned host key's algorithms and refuses any other key
(:class:`~criv.errors.HostKeyMismatch`, in :func:`criv.vmimage.sshwire.connect`).
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import paramiko
from paramiko.channel import Channel

from criv.errors import SSHUnavailable
from criv.vmimage.sshkeys import HostKeyPin
from criv.vmimage.sshwire import connect

CHUNK = 32 * 1024
# Connections being made at once to one pod: dropbear drops a client's sixth
# unauthenticated connection (MAX_UNAUTH_PER_IP 5).
MAX_HANDSHAKES = 4


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


def close_quietly(chan: Channel) -> None:
    """Close a channel; a connection that already died is no error (the close of a
    channel sends, and runs on threads nobody waits on)."""
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        chan.close()


def one_command_per_connection(server_version: str) -> bool:
    """dropbear 2022.82 to 2024.85 can abort a whole connection when one session's
    command exits while another channel waits for its exec request (mkj/dropbear#321,
    fixed in 2024.86): with those, each command gets a connection of its own."""
    m = re.match(r"SSH-2\.0-dropbear_(\d{4})\.(\d{1,4})", server_version)
    return m is not None and (int(m[1]), int(m[2])) < (2024, 86)


class SSHConnection:
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
