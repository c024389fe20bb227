"""Listen addresses: ``unix:PATH`` (host mode) or ``vsock:PORT`` (in the guest, any CID).

grpcio has no vsock support, so for a ``vsock:`` control address the agent serves gRPC on
a guest-local unix socket and a splice forwarder joins AF_VSOCK connections to it
(main.py); the data server is asyncio and listens on the AF_VSOCK socket itself."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Address:
    scheme: str
    path: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.scheme == "unix" else f"vsock:{self.port}"


def parse(addr: str) -> Address:
    scheme, _, rest = addr.partition(":")
    if scheme == "unix" and rest:
        return Address("unix", path=rest)
    if scheme == "vsock" and rest.isdigit():
        return Address("vsock", port=int(rest))
    raise ValueError(f"bad address {addr!r} (want unix:PATH or vsock:PORT)")


def listen(addr: Address) -> socket.socket:
    """A listening socket for ``addr`` (stale unix socket files are replaced)."""
    if addr.scheme == "vsock":
        vs = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        vs.bind((socket.VMADDR_CID_ANY, addr.port))
        vs.listen(128)
        vs.setblocking(False)
        return vs
    with contextlib.suppress(FileNotFoundError):
        os.unlink(addr.path)
    os.makedirs(os.path.dirname(addr.path) or ".", exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(addr.path)
    os.chmod(addr.path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock
