from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path

import pytest

from criv.vsock.host import parse_connect_line, port_socket_path
from criv.vsock.splice import Forwarder, join, pump


@pytest.mark.parametrize(
    ("line", "port"),
    [
        (b"CONNECT 1000", 1000),
        (b"CONNECT 0\r", 0),
        (b"CONNECT 4294967295", 2**32 - 1),
        (b"CONNECT 4294967296", None),
        (b"CONNECT -1", None),
        (b"CONNECT", None),
        (b"connect 5", None),
        (b"CONNECT 5 6", None),
        (b"", None),
    ],
)
def test_parse_connect_line(line: bytes, port: int | None) -> None:
    assert parse_connect_line(line) == port


def test_port_socket_path_differs_from_guest_initiated_path() -> None:
    assert port_socket_path("/run/vm/v.sock", 1024) == "/run/vm/v.sock.1024"


def test_pump_and_join_with_half_close() -> None:
    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    data = os.urandom(3 << 20)
    t = threading.Thread(target=join, args=(a2, b1))
    t.start()

    def writer() -> None:
        a1.sendall(data)
        a1.shutdown(socket.SHUT_WR)

    w = threading.Thread(target=writer)
    w.start()
    got = bytearray()
    while chunk := b2.recv(1 << 20):
        got += chunk
    assert got == data  # EOF passed through as shutdown(SHUT_WR)
    b2.sendall(b"reply after half close")
    b2.shutdown(socket.SHUT_WR)
    back = bytearray()
    while chunk := a1.recv(100):
        back += chunk
    assert back == b"reply after half close"
    t.join(5)
    w.join(5)
    assert not t.is_alive()
    for s in (a1, b2):
        s.close()


def test_pump_counts_bytes() -> None:
    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    a1.sendall(b"x" * 100_000)
    a1.close()
    assert pump(a2, b1) == 100_000
    for s in (a2, b1, b2):
        s.close()


def test_forwarder(tmp_path: Path) -> None:
    target = str(tmp_path / "target.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(target)
    srv.listen(1)

    def echo() -> None:
        c, _ = srv.accept()
        while d := c.recv(65536):
            c.sendall(d)
        c.close()

    threading.Thread(target=echo, daemon=True).start()

    def dial() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(target)
        return s

    fwd = Forwarder.unix_listener(str(tmp_path / "fwd.sock"), dial)
    fwd.start()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(str(tmp_path / "fwd.sock"))
    c.sendall(b"ping")
    assert c.recv(4) == b"ping"
    c.close()
    fwd.close()
    srv.close()


class _VsockLikeListener(socket.socket):
    """A unix listener whose shutdown() behaves as a listening AF_VSOCK socket's does:
    ENOTCONN, and no blocked accept() is woken."""

    def shutdown(self, how: int) -> None:
        raise OSError(errno.ENOTCONN, "listening vsock socket")


def _forwarding(listener_type: type[socket.socket], path: str) -> Forwarder:
    """A started Forwarder on a unix listener of ``listener_type`` at ``path``."""
    listener = listener_type(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    fwd = Forwarder(listener, lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    fwd.start()
    return fwd


def test_forwarder_close_ends_its_accept_thread_on_a_vsock_like_listener(tmp_path: Path) -> None:
    path = str(tmp_path / "fwd.sock")
    fwd = _forwarding(_VsockLikeListener, path)
    threading.Event().wait(0.1)  # the thread is waiting for a connection
    fwd.close()
    assert not any(t.name == "splice-forwarder" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(path)
    fwd.close()  # a second close is harmless


class _OutOfFilesListener(socket.socket):
    """A listener with a connection waiting whose accept() fails as at the fd limit."""

    accepts = 0

    def accept(self) -> tuple[socket.socket, object]:
        type(self).accepts += 1
        raise OSError(errno.EMFILE, "Too many open files")


def test_forwarder_does_not_spin_while_accept_fails(tmp_path: Path) -> None:
    path = str(tmp_path / "fwd.sock")
    fwd = _forwarding(_OutOfFilesListener, path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waiting:
        waiting.connect(path)  # the listener stays readable
        threading.Event().wait(0.5)
        fwd.close()
    # ~5 tries in 0.5 s with the pause; a busy loop makes thousands
    assert 1 <= _OutOfFilesListener.accepts < 50, _OutOfFilesListener.accepts


def test_kernel_connector_fails_cleanly() -> None:
    from criv.vsock.connector import KernelVsockConnector, VsockError

    with pytest.raises(VsockError):
        KernelVsockConnector(0x7FFFFFF0).connect(1, timeout=2)


def test_loop_survives_a_failing_handler() -> None:
    from criv.vsock.eventloop import Loop

    loop = Loop()
    ran: list[int] = []

    def bad() -> None:
        raise RuntimeError("boom")

    loop.call_later(0, bad)
    loop.call_later(0, lambda: ran.append(1))
    loop.run_once(0.01)
    assert ran == [1]
    loop.close()
