"""How criv's host side reaches a port of a guest over vsock.

Two transports, one interface:

* ``HybridVsockConnector``: criv's userspace backend (``python -m criv.vsock``), whose host
  side is a unix socket speaking the Firecracker hybrid-vsock handshake
  (``CONNECT <port>\\n`` -> ``OK <host port>\\n``).
* ``KernelVsockConnector``: ``AF_VSOCK`` to a guest CID, where the host has /dev/vhost-vsock.

grpcio cannot dial vsock, so ``grpc_target(port)`` returns a ``unix:`` target: the backend's
per-port socket (``--listen-port``) for the hybrid transport, a splice forwarder for the
kernel transport.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Protocol

from criv.vsock.host import port_socket_path

DEFAULT_TIMEOUT = 5.0


class VsockError(ConnectionError):
    """A vsock connection could not be made."""


class VsockBackendUnavailable(VsockError):
    """The host end of the transport (backend socket, vhost-vsock) is not there."""


class VsockConnectionRefused(VsockError):
    """The guest answered with a reset: nothing listens on that port (or it went away)."""


class VsockConnector(Protocol):
    async def open_connection(
        self, port: int, *, timeout: float = DEFAULT_TIMEOUT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream to guest ``port``; raises a ``VsockError`` subclass on failure."""
        ...

    def grpc_target(self, port: int) -> str:
        """A ``unix:`` target grpcio can dial that ends at guest ``port``."""
        ...


def _parse_ok(line: bytes, path: str, port: int) -> int:
    if not line:
        raise VsockConnectionRefused(
            f"guest port {port} via {path}: connection refused (closed without OK)"
        )
    parts = line.split()
    if len(parts) != 2 or parts[0] != b"OK" or not parts[1].isdigit():
        raise VsockError(f"guest port {port} via {path}: bad handshake answer {line!r}")
    return int(parts[1])


def hybrid_connect(path: str, port: int, *, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
    """Blocking hybrid-vsock connect; returns a connected blocking socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise VsockBackendUnavailable(f"vsock backend socket {path}: {e.strerror}") from e
        s.sendall(b"CONNECT %d\n" % port)
        line = bytearray()
        while not line.endswith(b"\n") and len(line) < 64:
            try:
                b = s.recv(1)
            except TimeoutError as e:
                raise VsockError(f"guest port {port} via {path}: handshake timed out") from e
            except ConnectionResetError:
                b = b""
            if not b:
                break
            line += b
        _parse_ok(bytes(line), path, port)
        s.settimeout(None)
        return s
    except BaseException:
        s.close()
        raise


class HybridVsockConnector:
    def __init__(self, uds_path: str) -> None:
        self.uds_path = uds_path

    async def open_connection(
        self, port: int, *, timeout: float = DEFAULT_TIMEOUT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.uds_path), timeout
            )
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise VsockBackendUnavailable(
                f"vsock backend socket {self.uds_path}: {e.strerror}"
            ) from e
        try:
            writer.write(b"CONNECT %d\n" % port)
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            except TimeoutError as e:
                raise VsockError(f"guest port {port}: handshake timed out") from e
            except ConnectionResetError:
                line = b""
            _parse_ok(line, self.uds_path, port)
        except BaseException:
            writer.close()
            raise
        return reader, writer

    def connect(self, port: int, *, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
        return hybrid_connect(self.uds_path, port, timeout=timeout)

    def grpc_target(self, port: int) -> str:
        """Needs the backend started with ``--listen-port <port>``."""
        path = port_socket_path(self.uds_path, port)
        if not os.path.exists(path):
            raise VsockBackendUnavailable(f"{path} missing: backend lacks --listen-port {port}")
        return f"unix:{path}"


class KernelVsockConnector:
    def __init__(self, cid: int, forward_dir: str | None = None) -> None:
        self.cid = cid
        self.forward_dir = forward_dir
        self._forwarders: dict[int, object] = {}

    def connect(self, port: int, *, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
        try:
            s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except OSError as e:
            raise VsockBackendUnavailable(f"AF_VSOCK unavailable: {e.strerror}") from e
        try:
            s.settimeout(timeout)
            s.connect((self.cid, port))
            s.settimeout(None)
            return s
        except ConnectionResetError as e:
            s.close()
            raise VsockConnectionRefused(f"CID {self.cid} port {port}: connection reset") from e
        except ConnectionRefusedError as e:
            s.close()
            raise VsockConnectionRefused(f"CID {self.cid} port {port}: refused") from e
        except OSError as e:
            s.close()
            raise VsockError(f"CID {self.cid} port {port}: {e}") from e

    async def open_connection(
        self, port: int, *, timeout: float = DEFAULT_TIMEOUT
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        s = await loop.run_in_executor(None, lambda: self.connect(port, timeout=timeout))
        return await asyncio.open_connection(sock=s)

    def grpc_target(self, port: int) -> str:
        """Starts (once per port) a splice forwarder: unix socket -> AF_VSOCK cid:port."""
        from criv.vsock.splice import Forwarder

        if self.forward_dir is None:
            raise VsockError("KernelVsockConnector needs forward_dir for grpc targets")
        path = os.path.join(self.forward_dir, f"vsock-{self.cid}-{port}.sock")
        if port not in self._forwarders:
            fwd = Forwarder.unix_listener(path, lambda: self.connect(port))
            fwd.start()
            self._forwarders[port] = fwd
        return f"unix:{path}"
