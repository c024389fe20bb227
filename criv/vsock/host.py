"""Host-side listening sockets of one VM's backend.

* The hybrid socket (``--uds PATH``), Firecracker / Cloud Hypervisor convention: a client
  connects, writes ``CONNECT <guest port>\\n`` and, once the guest accepted, reads
  ``OK <host port>\\n``; after that the unix connection is the stream.  If the guest refuses
  (or does not answer in time) the unix connection is closed without an OK.
* Per-port sockets (``--listen-port P``): every accepted connection goes straight to guest port
  P, with no handshake, so a plain client (grpcio's ``unix:`` target) can dial it.  Default
  path ``<uds>.<P>`` (not ``<uds>_<P>``: that name belongs to guest-initiated connections to
  host port P, which the backend *dials*).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import stat
from collections.abc import Callable

from criv.vsock.device import VsockDevice
from criv.vsock.eventloop import Loop

log = logging.getLogger("criv.vsock")

HANDSHAKE_MAX = 64
HANDSHAKE_TIMEOUT = 5.0


def port_socket_path(uds_path: str, port: int) -> str:
    """Default path of the per-port listener for guest port ``port``."""
    return f"{uds_path}.{port}"


def parse_connect_line(line: bytes) -> int | None:
    """Guest port of a ``CONNECT <port>`` line (without the newline), None if malformed."""
    parts = line.strip().split()
    if len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port <= 0xFFFFFFFF else None


def listen_unix(path: str, backlog: int = 128) -> socket.socket:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(backlog)
    s.setblocking(False)
    return s


class _Handshake:
    def __init__(self, owner: HostListeners, sock: socket.socket) -> None:
        self.owner = owner
        self.sock = sock
        self.buf = b""
        self.fd = sock.fileno()
        self.timer = owner.loop.call_later(HANDSHAKE_TIMEOUT, self.timeout)
        owner.loop.set(self.fd, self.readable)

    def readable(self) -> None:
        try:
            peek = self.sock.recv(HANDSHAKE_MAX - len(self.buf), socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            peek = b""
        if not peek:
            self.finish(None)
            return
        nl = peek.find(b"\n")
        # consume exactly the line; bytes after it belong to the stream
        chunk = self.sock.recv(nl + 1 if nl >= 0 else len(peek))
        self.buf += chunk
        if nl >= 0:
            port = parse_connect_line(self.buf[:-1])
            if port is None:
                log.info("bad hybrid handshake %r", self.buf[:HANDSHAKE_MAX])
            self.finish(port)
        elif len(self.buf) >= HANDSHAKE_MAX:
            log.info("hybrid handshake too long")
            self.finish(None)

    def timeout(self) -> None:
        self.timer = -1
        self.finish(None)

    def finish(self, port: int | None) -> None:
        loop = self.owner.loop
        if self.timer >= 0:
            loop.cancel(self.timer)
        loop.drop(self.fd)
        self.owner.pending.discard(self)
        if port is None:
            self.sock.close()
        else:
            self.owner.device.host_connect(self.sock, port, hybrid=True)


class HostListeners:
    def __init__(
        self,
        loop: Loop,
        device: VsockDevice,
        uds_path: str,
        listen_ports: dict[int, str] | None = None,
    ) -> None:
        self.loop = loop
        self.device = device
        self.paths: list[str] = []
        self.socks: list[socket.socket] = []
        self.pending: set[_Handshake] = set()
        hybrid = listen_unix(uds_path)
        self._add(hybrid, uds_path, lambda: self._accept_hybrid(hybrid))
        for port, path in (listen_ports or {}).items():
            s = listen_unix(path)
            self._add(s, path, functools.partial(self._accept_port, s, port))

    def _add(self, s: socket.socket, path: str, cb: Callable[[], None]) -> None:
        self.paths.append(path)
        self.socks.append(s)
        self.loop.set(s.fileno(), cb)

    @staticmethod
    def _accept(s: socket.socket) -> socket.socket | None:
        try:
            c, _ = s.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        c.setblocking(False)
        return c

    def _accept_hybrid(self, s: socket.socket) -> None:
        c = self._accept(s)
        if c is not None:
            self.pending.add(_Handshake(self, c))

    def _accept_port(self, s: socket.socket, port: int) -> None:
        c = self._accept(s)
        if c is not None:
            self.device.host_connect(c, port, hybrid=False)

    def close(self) -> None:
        for h in list(self.pending):
            h.finish(None)
        for s, path in zip(self.socks, self.paths, strict=True):
            self.loop.drop(s.fileno())
            s.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.socks = []
        self.paths = []
