"""Join two stream sockets with os.splice (zero-copy through a pipe), stdlib only.

Used where a vsock socket has to meet grpcio (which cannot do AF_VSOCK): in the guest agent
(AF_VSOCK listener -> local unix socket of the gRPC server) and on the host with kernel
vhost-vsock (unix listener -> AF_VSOCK).  One thread per direction; EOF on one side becomes
shutdown(SHUT_WR) on the other, so half-close passes through.  It lives in the agent package
because the guest has criv_agent but not criv; ``criv.vsock.splice`` re-exports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import socket
import threading
from collections.abc import Callable

log = logging.getLogger("criv.vsock.splice")

PIPE_SIZE = 1 << 20
CHUNK = 1 << 20
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_MORE", 4)


def _copy(src: socket.socket, dst: socket.socket) -> int:
    """Fallback for sockets that cannot splice."""
    total = 0
    buf = bytearray(CHUNK)
    while True:
        n = src.recv_into(buf)
        if not n:
            return total
        dst.sendall(memoryview(buf)[:n])
        total += n


def pump(src: socket.socket, dst: socket.socket) -> int:
    """Move bytes src -> dst until EOF on src; returns the byte count.  Blocking sockets."""
    r, w = os.pipe()
    total = 0
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        sfd, dfd = src.fileno(), dst.fileno()
        while True:
            try:
                n = os.splice(sfd, w, CHUNK, flags=_SPLICE_FLAGS)
            except OSError as e:
                if total == 0 and e.errno == 22:  # EINVAL: no splice for this socket
                    return _copy(src, dst)
                raise
            if n == 0:
                return total
            left = n
            while left:
                left -= os.splice(r, dfd, left, flags=_SPLICE_FLAGS)
            total += n
    finally:
        os.close(r)
        os.close(w)


def join(a: socket.socket, b: socket.socket) -> tuple[int, int]:
    """Forward both ways until both directions hit EOF (or one errors), then close both.
    Returns (bytes a->b, bytes b->a)."""
    counts = [0, 0]

    def one(i: int, src: socket.socket, dst: socket.socket) -> None:
        try:
            counts[i] = pump(src, dst)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        except OSError as e:
            log.debug("splice %d: %s", i, e)
            for s in (src, dst):  # unblock the other direction
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    a.setblocking(True)
    b.setblocking(True)
    t = threading.Thread(target=one, args=(1, b, a), daemon=True)
    t.start()
    one(0, a, b)
    t.join()
    a.close()
    b.close()
    return counts[0], counts[1]


class Forwarder:
    """Accept on ``listener``; for each connection ``dial()`` the other end and join them.

    The accept thread polls the listener and a wake pipe: ``shutdown()`` of a listening
    AF_VSOCK socket fails with ENOTCONN and wakes no ``accept()``, so closing through the
    listener alone left ``close()`` waiting out its join timeout (2 s of every pod stop).
    """

    def __init__(self, listener: socket.socket, dial: Callable[[], socket.socket]) -> None:
        self.listener = listener
        self.dial = dial
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()

    @classmethod
    def unix_listener(cls, path: str, dial: Callable[[], socket.socket]) -> Forwarder:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(128)
        return cls(s, dial)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve, daemon=True, name="splice-forwarder")
        self._thread.start()

    def serve(self) -> None:
        # non-blocking: a connection reset between poll and accept must not block the thread
        self.listener.setblocking(False)
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closed:
            if any(fd == self._wake_r for fd, _ in poller.poll()):
                return
            try:
                c, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):  # taken back before the accept
                continue
            except OSError as e:  # ECONNABORTED, EMFILE...: the listener stays readable
                if self._closed:
                    return
                log.debug("forwarder: accept: %s", e)
                if select.select([self._wake_r], [], [], 0.1)[0]:  # no busy loop meanwhile
                    return
                continue
            threading.Thread(target=self._one, args=(c,), daemon=True).start()

    def _one(self, c: socket.socket) -> None:
        try:
            other = self.dial()
        except OSError as e:
            log.info("forwarder: dial failed: %s", e)
            c.close()
            return
        join(c, other)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
