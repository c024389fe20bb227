"""Host -> guest: data read from a host socket straight into the guest's rx buffers, as much
as the guest's credit allows; host EOF becomes SHUTDOWN(SEND).  Nothing is buffered here: a
stream with no credit or no rx buffer stops reading its socket until the guest makes room."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from criv.vsock import packet as P
from criv.vsock.chains import scatter, split
from criv.vsock.connection import Connection

if TYPE_CHECKING:
    from criv.vsock.device import VsockDevice

log = logging.getLogger("criv.vsock")

RX_BATCH = 32  # packets per readable event, then other streams have a turn
RX = 0


class HostReader:
    def __init__(self, dev: VsockDevice) -> None:
        self.dev = dev

    def park(self, conn: Connection) -> None:
        """No rx buffer now: stop reading until the guest posts some (its rx kick)."""
        self.dev.parked[conn.sock.fileno()] = conn
        self.dev.update(conn)

    def readable(self, conn: Connection) -> None:
        dev = self.dev
        vq = dev.running(RX)
        if vq is None or dev.ctrl:
            self.park(conn)
            return
        for _ in range(RX_BATCH):
            credit = conn.peer_credit()
            if credit <= 0:
                if not conn.credit_requested:
                    conn.credit_requested = True
                    dev.send_ctrl(conn.header(P.OP_CREDIT_REQUEST))
                dev.update(conn)
                return
            chain = dev.pop_rx(vq)
            if chain is None:
                self.park(conn)
                return
            hdr_views, payload = split(chain.writable, P.HDR_SIZE, min(credit, P.MAX_PKT_PAYLOAD))
            if not payload:
                dev.mark_broken("rx buffer has no room for payload")
                return
            want = sum(len(v) for v in payload)
            try:
                if len(payload) == 1:
                    n = conn.sock.recv_into(payload[0])
                else:
                    n = conn.sock.recvmsg_into(payload)[0]
            except BlockingIOError:
                vq.unpop()
                return
            except OSError as e:
                vq.unpop()
                log.debug("%r: host read failed: %s", conn, e)
                dev.close(conn, rst=True)
                return
            if n == 0:
                vq.unpop()
                self.eof(conn)
                return
            scatter(hdr_views, conn.header(P.OP_RW, n).pack())
            vq.push(chain.head, P.HDR_SIZE + n)
            conn.on_sent(n)
            dev.stats["rx_bytes"] += n
            dev.signal[RX] = True
            if n < want:
                return

    def eof(self, conn: Connection) -> None:
        conn.host_eof = True
        self.dev.send_ctrl(conn.header(P.OP_SHUTDOWN, flags=P.SHUTDOWN_SEND))
        if conn.peer_shutdown & P.SHUTDOWN_SEND and not conn.pending:
            # both directions finished: forget it; the guest's final SHUTDOWN gets an RST
            self.dev.close(conn)
        else:
            self.dev.update(conn)
