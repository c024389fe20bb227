"""Stalled streams are reported, never silent.

Every ``CHECK_INTERVAL`` the monitor looks at each established stream.  One that has work
waiting (host data it cannot send to the guest, or guest data the host socket does not take)
and has moved no byte for ``STALL_AFTER`` seconds is logged once as stalled, with every credit
counter and the ring indices, and again when it moves.  While it waits on the guest it asks
again: a credit request (the guest's answer may have been lost) and, when the guest's view
of our free space is stale, a credit update (ours may have been dropped)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

from criv.vsock import packet as P
from criv.vsock.connection import Connection, State

TYPE_CHECKING = False  # as typing.TYPE_CHECKING; the backend does not import typing
if TYPE_CHECKING:
    from criv.vsock.device import VsockDevice

log = logging.getLogger("criv.vsock")

CHECK_INTERVAL = 2.0
STALL_AFTER = 10.0


def host_has_data(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError: nothing to read
        return False


class StallMonitor:
    def __init__(self, dev: VsockDevice, clock: Callable[[], float] = time.monotonic) -> None:
        self.dev = dev
        self.clock = clock

    def start(self) -> None:
        self.dev.loop.call_later(CHECK_INTERVAL, self._tick)

    def _tick(self) -> None:
        self.dev.loop.call_later(CHECK_INTERVAL, self._tick)
        self.check()

    def check(self) -> None:
        now = self.clock()
        for conn in list(self.dev.conns.values()):
            mark = (conn.tx_cnt, conn.rx_cnt, conn.fwd_cnt)
            if conn.progress_at == 0.0 or mark != conn.progress:
                if conn.stalled:
                    log.warning("%r: moving again after %.0f s", conn, now - conn.progress_at)
                conn.progress, conn.progress_at, conn.stalled = mark, now, False
                continue
            if conn.state is not State.ESTABLISHED or now - conn.progress_at < STALL_AFTER:
                continue
            if conn.fwd_cnt != conn.last_fwd_cnt:  # our last credit update may have been dropped
                self.dev.send_ctrl(conn.header(P.OP_CREDIT_UPDATE))
            why = self.waiting_for(conn)
            if why is None:
                conn.progress_at = now  # idle: nothing to move
                continue
            if not conn.stalled:
                conn.stalled = True
                self.dev.stats["stalls"] += 1
                log.warning(
                    "%r: stalled %.0f s, %s; %s; %s",
                    conn,
                    now - conn.progress_at,
                    why,
                    conn.counters(),
                    self.dev.rings(),
                )
            if conn.peer_credit() <= 0:  # the guest's last credit update may have been lost
                self.dev.send_ctrl(conn.header(P.OP_CREDIT_REQUEST))

    def waiting_for(self, conn: Connection) -> str | None:
        """What the stream waits on, None when it has nothing to move."""
        if conn.pending:
            return f"the host socket takes none of {len(conn.pending)} held bytes"
        if conn.host_eof or conn.peer_shutdown & P.SHUTDOWN_RCV or not host_has_data(conn.sock):
            return None
        if conn.peer_credit() <= 0:
            return "host data waits for guest credit (the guest reader consumes nothing)"
        if conn.sock.fileno() in self.dev.parked or self.dev.ctrl:
            return "host data waits for the guest to post receive buffers"
        return "host data is not read (backend bug)"

    def stalled(self) -> int:
        return sum(1 for c in self.dev.conns.values() if c.stalled)
