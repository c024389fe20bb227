"""Listen addresses: ``unix:PATH`` now; ``vsock:PORT`` is reserved for the guest, where
a splice forwarder joins AF_VSOCK to these unix sockets (grpcio has no vsock support)."""

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
    if addr.scheme != "unix":
        raise NotImplementedError("vsock listeners come with the VM issue")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(addr.path)
    os.makedirs(os.path.dirname(addr.path) or ".", exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(addr.path)
    os.chmod(addr.path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock
