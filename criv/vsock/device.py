"""The vsock device: guest packets from the tx queue, host data into the rx queue, and the
table of connections between guest ports and host unix sockets.

Queue 0 is rx (device -> driver), queue 1 is tx (driver -> device).  QEMU's
vhost-user-vsock keeps the event queue (queue 2) to itself.  The Linux semantics mirrored here
are those of net/vmw_vsock/virtio_transport_common.c (6.1): REQUEST/RESPONSE handshake,
credit-based flow control, SHUTDOWN(RCV|SEND), and RST for anything addressed to an unknown
connection.  Host -> guest data is read in ``hostread``, guest -> host data and shutdowns
are written in ``hostwrite``, stalls are reported by ``health``.
"""

from __future__ import annotations

import collections
import logging
import socket
from collections.abc import Callable

from criv.vsock import packet as P
from criv.vsock.chains import gather, scatter, split
from criv.vsock.connection import DEFAULT_BUF_ALLOC, Connection, State
from criv.vsock.eventloop import Loop
from criv.vsock.health import StallMonitor
from criv.vsock.hostread import HostReader
from criv.vsock.hostwrite import DEFAULT_MAX_BUFFERED, HostWriter
from criv.vsock.logcap import RateLimited
from criv.vsock.notify import RESIGNAL_AFTER, RX, TX, Interrupts
from criv.vsock.virtqueue import Chain, VirtQueue, VirtQueueError

log = logging.getLogger("criv.vsock")

HOST_PORT_BASE = 1 << 30
CONNECT_TIMEOUT = 5.0
MAX_CTRL_BACKLOG = 4096
_HDR_UNPACK = P.HDR.unpack_from
__all__ = ["RESIGNAL_AFTER", "RX", "TX", "VsockDevice"]


class VsockDevice:
    def __init__(
        self,
        loop: Loop,
        guest_cid: int,
        uds_path: str,
        *,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
    ) -> None:
        self.loop = loop
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.buf_alloc = buf_alloc
        self.queues: dict[int, VirtQueue] = {}
        self.irq = Interrupts(self)
        self.signal = self.irq.signal  # used entries pushed since the last interrupt
        self.held = self.irq.held  # an interrupt the driver had switched off
        self.conns: dict[tuple[int, int], Connection] = {}
        self.ctrl: collections.deque[bytes] = collections.deque()
        self.parked: dict[int, Connection] = {}  # host data waiting for rx buffers
        self.broken: str | None = None
        self._next_port = HOST_PORT_BASE
        self.stats = {
            "rx_bytes": 0,
            "tx_bytes": 0,
            "conns_total": 0,
            "credit_overruns": 0,
            "buffer_cap_resets": 0,
            "stalls": 0,
            "interrupts_resent": 0,
        }
        self.warn = RateLimited(log)  # for what a guest can trigger at will
        self.reader = HostReader(self)
        self.writer = HostWriter(self, max_buffered)
        self.monitor = StallMonitor(self)
        loop.idle_hooks.append(self.irq.flush)
        self.monitor.start()

    # -- queue lifecycle (driven by the vhost-user front end) ---------------------------
    def start_queue(self, index: int, vq: VirtQueue) -> None:
        if not self.queues:
            self.broken = None
        self.queues[index] = vq
        self.kick(index)

    def set_call(self, index: int, fd: int | None) -> None:
        self.irq.set_call(index, fd)

    def stop_queue(self, index: int) -> VirtQueue | None:
        vq = self.queues.pop(index, None)
        self.reset_all("device stopped")
        return vq

    def kick(self, index: int) -> None:
        # The driver always kicks: we never set VRING_USED_F_NO_NOTIFY, as the driver's
        # "publish, then read the flag" is not ordered under single-vCPU TCG (no host fence).
        if index == RX:
            self.rx_kick()
        elif index == TX:
            self.tx_kick()

    def mark_broken(self, reason: str) -> None:
        if self.broken is None:
            log.error("device broken, stopping all processing: %s", reason)
        self.broken = reason
        self.reset_all("device broken")

    def reset_all(self, why: str) -> None:
        if self.conns:
            log.info("closing %d connection(s): %s", len(self.conns), why)
        for conn in list(self.conns.values()):
            self.close(conn)
        self.ctrl.clear()
        self.parked.clear()

    def running(self, index: int) -> VirtQueue | None:
        return None if self.broken is not None else self.queues.get(index)

    def rings(self) -> str:
        """Ring indices and backlogs, for stall reports and the state dump."""
        out = []
        for name, index in (("rx", RX), ("tx", TX)):
            if (vq := self.queues.get(index)) is not None:
                out.append(f"{name} avail={vq.avail_idx()} last_avail={vq.last_avail}")
                out.append(f"used={vq.used_idx}")
        out.append(f"ctrl_backlog={len(self.ctrl)} parked={len(self.parked)}")
        return " ".join(out)

    # -- rx: packets to the guest ------------------------------------------------------------
    def send_ctrl(self, hdr: P.Header) -> None:
        data = hdr.pack()
        if not self.ctrl and self._put_rx(data):
            return
        if len(self.ctrl) >= MAX_CTRL_BACKLOG:
            self.warn.warning("ctrl backlog", "control backlog full, dropping %s", hdr)
            return
        self.ctrl.append(data)

    def pop_rx(self, vq: VirtQueue) -> Chain | None:
        try:
            chain = vq.pop()
            if chain is not None and chain.write_len() < P.HDR_SIZE:
                raise VirtQueueError(f"rx buffer of {chain.write_len()} bytes < header")
        except VirtQueueError as e:
            self.mark_broken(f"rx queue: {e}")
            return None
        return chain

    def _put_rx(self, data: bytes) -> bool:
        vq = self.running(RX)
        if vq is None:
            return False
        chain = self.pop_rx(vq)
        if chain is None:
            return False
        scatter(chain.writable, data)
        vq.push(chain.head, len(data))
        self.signal[RX] = True
        return True

    def rx_kick(self) -> None:
        while self.ctrl:
            if not self._put_rx(self.ctrl[0]):
                return
            self.ctrl.popleft()
        parked, self.parked = self.parked, {}
        for conn in parked.values():
            self.update(conn)

    # -- tx: packets from the guest ----------------------------------------------------------
    def tx_kick(self) -> None:
        vq = self.running(TX)
        if vq is None:
            return
        budget = 4 * vq.num  # then let host sockets and rx have a turn
        used = 0
        try:
            while (chain := vq.pop()) is not None:
                self._guest_packet(chain)
                vq.add_used(chain.head, 0)
                used += len(chain.readable) + len(chain.writable)
                if self.broken is not None:
                    return
                budget -= 1
                if budget <= 0:
                    self.loop.call_later(0, self.tx_kick)
                    break
        except VirtQueueError as e:
            self.mark_broken(f"tx queue: {e}")
            return
        if used:
            vq.publish()  # one used-index store for the whole batch
            self.irq.tx_used(used)

    def _guest_packet(self, chain: Chain) -> None:
        readable = chain.readable
        total = chain.read_len()
        if total < P.HDR_SIZE:
            raise VirtQueueError(f"tx packet of {total} bytes < header")
        first = readable[0]
        fields = _HDR_UNPACK(first if len(first) >= P.HDR_SIZE else gather(readable, P.HDR_SIZE))
        src_cid, dst_cid, src_port, dst_port, length, typ, op, _, buf_alloc, fwd_cnt = fields
        if length > total - P.HDR_SIZE or length > P.MAX_PKT_PAYLOAD:
            raise VirtQueueError(f"tx packet claims {length} payload bytes, has {total - 44}")
        conn = self.conns.get((dst_port, src_port))
        if (
            conn is None
            or typ != P.TYPE_STREAM
            or src_cid != self.guest_cid
            or dst_cid != P.HOST_CID
        ):
            self._no_stream(P.Header(*fields))
            return
        conn.update_peer(buf_alloc, fwd_cnt)
        if op == P.OP_RW:
            if length:
                _, payload = split(readable, P.HDR_SIZE, length)
                self.writer.data(conn, payload, length)
        elif op == P.OP_RESPONSE:
            self._guest_response(conn)
        elif op == P.OP_CREDIT_REQUEST:
            self.send_ctrl(conn.header(P.OP_CREDIT_UPDATE))
        elif op == P.OP_SHUTDOWN:
            self.writer.shutdown(conn, fields[7] & P.SHUTDOWN_BOTH)
        elif op == P.OP_RST:
            log.debug("%r: reset by guest", conn)
            self.close(conn)
        elif op != P.OP_CREDIT_UPDATE:
            self.close(conn, rst=True)
            return
        if conn.state is not State.CLOSED:
            self.update(conn)

    def _no_stream(self, hdr: P.Header) -> None:
        """A packet for none of our streams: bad addresses are dropped, a REQUEST connects, anything
        else but an RST is answered with one."""
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != P.HOST_CID:
            self.warn.warning("bad addresses", "dropping packet with bad addresses: %s", hdr)
        elif hdr.type != P.TYPE_STREAM:
            if hdr.op != P.OP_RST:
                self._rst_reply(hdr)
        elif hdr.op == P.OP_REQUEST:
            self._guest_connect(hdr)
        elif hdr.op != P.OP_RST:
            self._rst_reply(hdr)

    def _rst_reply(self, hdr: P.Header) -> None:
        self.send_ctrl(
            P.Header(
                P.HOST_CID, hdr.src_cid, hdr.dst_port, hdr.src_port, 0, hdr.type, P.OP_RST, 0, 0, 0
            )
        )

    def _guest_connect(self, hdr: P.Header) -> None:
        path = f"{self.uds_path}_{hdr.dst_port}"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            log.debug("guest port %d -> host port %d: %s", hdr.src_port, hdr.dst_port, e)
            self._rst_reply(hdr)
            return
        conn = self._add(s, hdr.dst_port, hdr.src_port, State.ESTABLISHED)
        conn.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        self.send_ctrl(conn.header(P.OP_RESPONSE))
        self.update(conn)

    def _guest_response(self, conn: Connection) -> None:
        if conn.state is not State.CONNECTING:
            self.close(conn, rst=True)
            return
        conn.state = State.ESTABLISHED
        if conn.timer is not None:
            self.loop.cancel(conn.timer)
            conn.timer = None
        if conn.hybrid:
            try:
                conn.sock.send(f"OK {conn.host_port}\n".encode())
            except OSError:
                self.close(conn, rst=True)

    # -- host-initiated connections ----------------------------------------------------------
    def host_connect(self, sock: socket.socket, guest_port: int, *, hybrid: bool) -> None:
        """A host client wants guest ``guest_port``: send REQUEST, answer on RESPONSE/RST."""
        if self.broken is not None or RX not in self.queues:
            log.info("host connect to port %d refused: device not running", guest_port)
            sock.close()
            return
        port = self._alloc_port(guest_port)
        conn = self._add(sock, port, guest_port, State.CONNECTING, hybrid=hybrid)
        conn.timer = self.loop.call_later(CONNECT_TIMEOUT, lambda: self._connect_timeout(conn))
        self.send_ctrl(conn.header(P.OP_REQUEST))
        # watch for the host client going away while we wait
        self.update(conn)

    def _connect_timeout(self, conn: Connection) -> None:
        conn.timer = None
        if conn.state is State.CONNECTING:
            log.info("%r: connect timed out", conn)
            self.close(conn, rst=True)

    def _alloc_port(self, guest_port: int) -> int:
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < 0xFFFFFFFE else HOST_PORT_BASE
            if (port, guest_port) not in self.conns:
                return port

    # -- bookkeeping -------------------------------------------------------------------------
    def _add(
        self,
        sock: socket.socket,
        host_port: int,
        guest_port: int,
        state: State,
        *,
        hybrid: bool = False,
    ) -> Connection:
        sock.setblocking(False)
        conn = Connection(
            sock,
            host_port,
            guest_port,
            self.guest_cid,
            state=state,
            hybrid=hybrid,
            buf_alloc=self.buf_alloc,
        )
        conn.on_read = lambda: self.reader.readable(conn)
        conn.on_write = lambda: self.writer.writable(conn)
        self.conns[conn.key] = conn
        self.stats["conns_total"] += 1
        return conn

    def update(self, conn: Connection) -> None:
        """Watch the host socket for what the connection can do now."""
        fd = conn.sock.fileno()
        if fd < 0:
            return
        read: Callable[[], None] | None = None
        if conn.state is State.CONNECTING:
            read = lambda: self._connecting_readable(conn)  # noqa: E731
        elif conn.want_host_read() and fd not in self.parked:
            read = conn.on_read
        write = conn.on_write if conn.pending else None
        self.loop.set(fd, read, write)

    def _connecting_readable(self, conn: Connection) -> None:
        """Before RESPONSE we only watch for the client hanging up."""
        try:
            data = conn.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.loop.set(conn.sock.fileno(), None)  # data waits until established
        else:
            self.close(conn, rst=True)

    def close(self, conn: Connection, *, rst: bool = False) -> None:
        if conn.state is State.CLOSED:
            return
        if rst:
            self.send_ctrl(conn.header(P.OP_RST))
        conn.state = State.CLOSED
        if conn.timer is not None:
            self.loop.cancel(conn.timer)
            conn.timer = None
        self.conns.pop(conn.key, None)
        fd = conn.sock.fileno()
        if fd >= 0:
            self.parked.pop(fd, None)
            self.loop.drop(fd)
        conn.sock.close()
        self.writer.forget(conn)
