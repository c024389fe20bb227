"""Host -> guest: data read from a host socket straight into the guest's rx buffers, as much
as the guest's credit allows; host EOF becomes SHUTDOWN(SEND).  Nothing is buffered here: a
stream with no credit or no rx buffer stops reading its socket until the guest makes room."""

from __future__ import annotations

import logging

from criv.vsock import packet as P
from criv.vsock.chains import scatter, split
from criv.vsock.connection import Connection

TYPE_CHECKING = False  # as typing.TYPE_CHECKING; the backend does not import typing
if TYPE_CHECKING:
    from criv.vsock.device import VsockDevice

log = logging.getLogger("criv.vsock")

RX_BATCH = 32  # rx buffers filled by one host read, then other streams have a turn
RX = 0


class HostReader:
    def __init__(self, dev: VsockDevice) -> None:
        self.dev = dev

    def park(self, conn: Connection) -> None:
        """No rx buffer now: stop reading until the guest posts some (its rx kick)."""
        self.dev.parked[conn.sock.fileno()] = conn
        self.dev.update(conn)

    def readable(self, conn: Connection) -> None:
        """One ``recvmsg_into`` straight into up to ``RX_BATCH`` rx buffers (within credit),
        then one packet per buffer filled and one used-index store for all of them."""
        dev = self.dev
        vq = dev.running(RX)
        if vq is None or dev.ctrl:
            self.park(conn)
            return
        credit = conn.peer_credit()
        if credit <= 0:
            self.out_of_credit(conn)
            return
        bufs: list[tuple[int, list[memoryview], int]] = []  # (head, header views, room)
        iov: list[memoryview] = []
        room = 0
        want = min(credit, conn.read_hint)
        while len(bufs) < RX_BATCH and room < want:
            chain = dev.pop_rx(vq)
            if chain is None:
                break
            limit = min(credit - room, P.MAX_PKT_PAYLOAD)  # not ``want``: a whole buffer
            hdr_views, payload = split(chain.writable, P.HDR_SIZE, limit)
            if not payload:
                dev.mark_broken("rx buffer has no room for payload")
                return
            n = sum(len(v) for v in payload)
            bufs.append((chain.head, hdr_views, n))
            iov += payload
            room += n
        if dev.broken is not None:
            return
        if not bufs:
            self.park(conn)
            return
        try:
            got = conn.sock.recv_into(iov[0]) if len(iov) == 1 else conn.sock.recvmsg_into(iov)[0]
        except BlockingIOError:
            vq.unpop(len(bufs))
            return
        except OSError as e:
            vq.unpop(len(bufs))
            log.debug("%r: host read failed: %s", conn, e)
            dev.close(conn, rst=True)
            return
        if got == 0:
            vq.unpop(len(bufs))
            self.eof(conn)
            return
        # as many buffers as the last read filled, twice that if it filled them all: a small
        # message takes one chain off the ring, a bulk stream soon RX_BATCH
        conn.read_hint = 2 * got if got == room else got
        left = got
        filled = 0
        for head, hdr_views, n in bufs:
            k = min(n, left)
            if len(hdr_views) == 1:
                conn.pack_rw_header(hdr_views[0], k)
            else:
                scatter(hdr_views, conn.header(P.OP_RW, k).pack())
            vq.add_used(head, P.HDR_SIZE + k)
            filled += 1
            left -= k
            if not left:
                break
        vq.publish()
        vq.unpop(len(bufs) - filled)
        conn.on_sent(got)
        dev.stats["rx_bytes"] += got
        dev.signal[RX] = True
        if got == room and room >= credit:
            self.out_of_credit(conn)
        elif got == room and len(bufs) < RX_BATCH and room < want:
            self.park(conn)  # maybe more to read, but the guest has no rx buffer left

    def out_of_credit(self, conn: Connection) -> None:
        """Stop reading the host socket until the guest gives credit; ask for it once."""
        if not conn.credit_requested:
            conn.credit_requested = True
            self.dev.send_ctrl(conn.header(P.OP_CREDIT_REQUEST))
        self.dev.update(conn)

    def eof(self, conn: Connection) -> None:
        conn.host_eof = True
        self.dev.send_ctrl(conn.header(P.OP_SHUTDOWN, flags=P.SHUTDOWN_SEND))
        if conn.peer_shutdown & P.SHUTDOWN_SEND and not conn.pending:
            # both directions finished: forget it; the guest's final SHUTDOWN gets an RST
            self.dev.close(conn)
        else:
            self.dev.update(conn)
