"""Guest -> host: stream data the guest sent, written to the host socket, or held until the
socket drains, and the guest's shutdowns.

What is held is bounded twice, so a guest cannot make the backend grow: per connection by the
credit we advertised (``buf_alloc`` bytes not yet written to the host; a guest that sends more
is reset), and per device by ``max_buffered`` (the connection whose data would pass it is
reset: many streams whose host readers are all slow)."""

from __future__ import annotations

import contextlib
import logging
import socket

from criv.vsock import packet as P
from criv.vsock.connection import Connection, State

TYPE_CHECKING = False  # as typing.TYPE_CHECKING; the backend does not import typing
if TYPE_CHECKING:
    from criv.vsock.device import VsockDevice

log = logging.getLogger("criv.vsock")

DEFAULT_MAX_BUFFERED = 32 << 20


class HostWriter:
    def __init__(self, dev: VsockDevice, max_buffered: int = DEFAULT_MAX_BUFFERED) -> None:
        self.dev = dev
        self.max_buffered = max_buffered
        self.buffered = 0  # sum of every connection's pending bytes

    def data(self, conn: Connection, payload: list[memoryview], n: int) -> None:
        dev = self.dev
        if conn.state is not State.ESTABLISHED or conn.peer_shutdown & P.SHUTDOWN_SEND:
            dev.close(conn, rst=True)
            return
        if not conn.on_received(n):
            dev.stats["credit_overruns"] += 1
            dev.warn.warning(
                "credit overrun",
                "%r: the guest sent beyond the credit it was given, resetting (%s)",
                conn,
                conn.counters(),
            )
            dev.close(conn, rst=True)
            return
        dev.stats["tx_bytes"] += n
        sent = 0
        if not conn.pending:
            try:
                if len(payload) == 1:
                    sent = conn.sock.send(payload[0])
                else:
                    sent = conn.sock.sendmsg(payload)
            except BlockingIOError:
                sent = 0
            except OSError as e:
                log.debug("%r: host write failed: %s", conn, e)
                dev.close(conn, rst=True)
                return
            conn.on_forwarded(sent)
        if sent < n:
            if self.buffered + n - sent > self.max_buffered:
                dev.stats["buffer_cap_resets"] += 1
                dev.warn.warning(
                    "buffer cap",
                    "%r: %d bytes held for slow host readers already, device cap %d;"
                    " resetting (%s)",
                    conn,
                    self.buffered,
                    self.max_buffered,
                    conn.counters(),
                )
                dev.close(conn, rst=True)
                return
            self._hold(conn, payload, sent)
        if conn.needs_credit_update():
            dev.send_ctrl(conn.header(P.OP_CREDIT_UPDATE))

    def _hold(self, conn: Connection, payload: list[memoryview], skip: int) -> None:
        before = len(conn.pending)
        for v in payload:
            if skip >= len(v):
                skip -= len(v)
                continue
            conn.pending += v[skip:]
            skip = 0
        self.buffered += len(conn.pending) - before

    def writable(self, conn: Connection) -> None:
        """The host socket takes data again."""
        dev = self.dev
        try:
            sent = conn.sock.send(conn.pending)
        except BlockingIOError:
            return
        except OSError as e:
            log.debug("%r: host write failed: %s", conn, e)
            dev.close(conn, rst=True)
            return
        del conn.pending[:sent]
        self.buffered -= sent
        conn.on_forwarded(sent)
        if conn.needs_credit_update():
            dev.send_ctrl(conn.header(P.OP_CREDIT_UPDATE))
        if not conn.pending:
            self.flushed(conn)
        if conn.state is not State.CLOSED:
            dev.update(conn)

    def forget(self, conn: Connection) -> None:
        """The connection is closed: what it held is dropped."""
        self.buffered -= len(conn.pending)
        conn.pending = bytearray()

    def shutdown(self, conn: Connection, flags: int) -> None:
        new = flags & ~conn.peer_shutdown
        conn.peer_shutdown |= flags
        if new & P.SHUTDOWN_RCV:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RD)
        if not conn.pending:
            self.flushed(conn)

    def flushed(self, conn: Connection) -> None:
        """Everything the guest sent has reached the host socket."""
        if conn.peer_shutdown == P.SHUTDOWN_BOTH:
            self.dev.close(conn, rst=True)  # Linux waits for this RST after close()
            return
        if conn.peer_shutdown & P.SHUTDOWN_SEND and not conn.host_wr_shut:
            conn.host_wr_shut = True
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            if conn.host_eof:
                self.dev.close(conn)
