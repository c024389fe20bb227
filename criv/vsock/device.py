"""The vsock device: guest packets from the tx queue, host data into the rx queue, and the
table of connections between guest ports and host unix sockets.

Queue 0 is rx (device -> driver), queue 1 is tx (driver -> device).  QEMU's
vhost-user-vsock keeps the event queue (queue 2) to itself.  The Linux semantics mirrored here
are those of net/vmw_vsock/virtio_transport_common.c (6.1): REQUEST/RESPONSE handshake,
credit-based flow control, SHUTDOWN(RCV|SEND), and RST for anything addressed to an unknown
connection.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from criv.vsock import packet as P
from criv.vsock.connection import DEFAULT_BUF_ALLOC, Connection, State
from criv.vsock.eventloop import Loop
from criv.vsock.virtqueue import Chain, VirtQueue, VirtQueueError

log = logging.getLogger("criv.vsock")

RX, TX = 0, 1
HOST_PORT_BASE = 1 << 30
CONNECT_TIMEOUT = 5.0
MAX_CTRL_BACKLOG = 4096
RX_BATCH = 32
WATCHDOG_INTERVAL = 0.5
_ONE = (1).to_bytes(8, "little")


def scatter(views: list[memoryview], data: bytes) -> None:
    """Copy ``data`` across ``views`` (the caller checked the total size)."""
    pos = 0
    for v in views:
        n = min(len(v), len(data) - pos)
        v[:n] = data[pos : pos + n]
        pos += n
        if pos == len(data):
            return


def gather(views: list[memoryview], n: int) -> bytes:
    out = bytearray()
    for v in views:
        out += v[: n - len(out)]
        if len(out) >= n:
            break
    return bytes(out)


def split(
    views: list[memoryview], at: int, limit: int
) -> tuple[list[memoryview], list[memoryview]]:
    """Split ``views`` into the first ``at`` bytes and at most ``limit`` bytes after them."""
    head: list[memoryview] = []
    tail: list[memoryview] = []
    for v in views:
        if at > 0:
            if len(v) <= at:
                head.append(v)
                at -= len(v)
                continue
            head.append(v[:at])
            v = v[at:]
            at = 0
        if limit <= 0:
            break
        if len(v) > limit:
            v = v[:limit]
        tail.append(v)
        limit -= len(v)
    return head, tail


class VsockDevice:
    def __init__(
        self,
        loop: Loop,
        guest_cid: int,
        uds_path: str,
        *,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
    ) -> None:
        self.loop = loop
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.buf_alloc = buf_alloc
        self.queues: dict[int, VirtQueue] = {}
        self.calls: dict[int, int] = {}
        self.signal = [False, False]
        self.conns: dict[tuple[int, int], Connection] = {}
        self.ctrl: collections.deque[bytes] = collections.deque()
        self.parked: dict[int, Connection] = {}  # host data waiting for rx buffers
        self.broken: str | None = None
        self._next_port = HOST_PORT_BASE
        self.stats = {"rx_bytes": 0, "tx_bytes": 0, "conns_total": 0}
        loop.idle_hooks.append(self.flush_signals)
        loop.call_later(WATCHDOG_INTERVAL, self._watchdog)

    # -- queue lifecycle (driven by the vhost-user front end) ---------------------------
    def start_queue(self, index: int, vq: VirtQueue) -> None:
        if not self.queues:
            self.broken = None
        self.queues[index] = vq
        if index == RX:
            self.rx_kick()
        elif index == TX:
            self.tx_kick()

    def set_call(self, index: int, fd: int | None) -> None:
        old = self.calls.pop(index, None)
        if old is not None:
            os.close(old)
        if fd is not None:
            self.calls[index] = fd

    def stop_queue(self, index: int) -> VirtQueue | None:
        vq = self.queues.pop(index, None)
        self.reset_all("device stopped")
        return vq

    def kick(self, index: int) -> None:
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
            self._close(conn)
        self.ctrl.clear()
        self.parked.clear()

    def flush_signals(self) -> None:
        for index in (RX, TX):
            if self.signal[index]:
                self.signal[index] = False
                vq = self.queues.get(index)
                fd = self.calls.get(index)
                if vq is not None and fd is not None and vq.needs_interrupt():
                    os.write(fd, _ONE)

    def _watchdog(self) -> None:
        """Belt and braces against a lost notification in either direction: while streams are
        open, poll both rings and re-signal the guest (a spurious interrupt is harmless)."""
        self.loop.call_later(WATCHDOG_INTERVAL, self._watchdog)
        if self.conns and self.broken is None:
            self.tx_kick()
            self.rx_kick()
            self.signal = [True, True]

    def running(self, index: int) -> VirtQueue | None:
        return None if self.broken is not None else self.queues.get(index)

    # -- rx: packets to the guest ------------------------------------------------------------
    def send_ctrl(self, hdr: P.Header) -> None:
        data = hdr.pack()
        if not self.ctrl and self._put_rx(data):
            return
        if len(self.ctrl) >= MAX_CTRL_BACKLOG:
            log.warning("control backlog full, dropping %s", hdr)
            return
        self.ctrl.append(data)

    def _pop_rx(self, vq: VirtQueue) -> Chain | None:
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
        chain = self._pop_rx(vq)
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
            self._update(conn)

    def _park(self, conn: Connection) -> None:
        self.parked[conn.sock.fileno()] = conn
        self._update(conn)

    def _host_readable(self, conn: Connection) -> None:
        vq = self.running(RX)
        if vq is None or self.ctrl:
            self._park(conn)
            return
        for _ in range(RX_BATCH):
            credit = conn.peer_credit()
            if credit <= 0:
                if not conn.credit_requested:
                    conn.credit_requested = True
                    self.send_ctrl(conn.header(P.OP_CREDIT_REQUEST))
                self._update(conn)
                return
            chain = self._pop_rx(vq)
            if chain is None:
                self._park(conn)
                return
            hdr_views, payload = split(chain.writable, P.HDR_SIZE, min(credit, P.MAX_PKT_PAYLOAD))
            if not payload:
                self.mark_broken("rx buffer has no room for payload")
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
                self._close(conn, rst=True)
                return
            if n == 0:
                vq.unpop()
                self._host_eof(conn)
                return
            scatter(hdr_views, conn.header(P.OP_RW, n).pack())
            vq.push(chain.head, P.HDR_SIZE + n)
            conn.on_sent(n)
            self.stats["rx_bytes"] += n
            self.signal[RX] = True
            if n < want:
                return

    def _host_eof(self, conn: Connection) -> None:
        conn.host_eof = True
        self.send_ctrl(conn.header(P.OP_SHUTDOWN, flags=P.SHUTDOWN_SEND))
        if conn.peer_shutdown & P.SHUTDOWN_SEND and not conn.pending:
            # both directions finished: forget it; the guest's final SHUTDOWN gets an RST
            self._close(conn)
        else:
            self._update(conn)

    # -- tx: packets from the guest ----------------------------------------------------------
    def tx_kick(self) -> None:
        vq = self.running(TX)
        if vq is None:
            return
        budget = 4 * vq.num  # then let host sockets and rx have a turn
        try:
            while True:
                vq.set_notify(False)
                while (chain := vq.pop()) is not None:
                    self._guest_packet(chain)
                    vq.push(chain.head, 0)
                    self.signal[TX] = True
                    if self.broken is not None:
                        return
                    budget -= 1
                    if budget <= 0:
                        vq.set_notify(True)
                        self.loop.call_later(0, self.tx_kick)
                        return
                vq.set_notify(True)
                if not vq.pending():
                    return
        except VirtQueueError as e:
            self.mark_broken(f"tx queue: {e}")

    def _guest_packet(self, chain: Chain) -> None:
        readable = chain.readable
        total = chain.read_len()
        if total < P.HDR_SIZE:
            raise VirtQueueError(f"tx packet of {total} bytes < header")
        first = readable[0]
        hdr = P.Header.unpack(first if len(first) >= P.HDR_SIZE else gather(readable, P.HDR_SIZE))
        if hdr.len > total - P.HDR_SIZE or hdr.len > P.MAX_PKT_PAYLOAD:
            raise VirtQueueError(f"tx packet claims {hdr.len} payload bytes, has {total - 44}")
        if hdr.src_cid != self.guest_cid or hdr.dst_cid != P.HOST_CID:
            log.warning(
                "dropping packet with bad addresses: %s (chain %s)",
                hdr,
                [len(v) for v in readable],
            )
            return
        if hdr.type != P.TYPE_STREAM:
            if hdr.op != P.OP_RST:
                self._rst_reply(hdr)
            return
        conn = self.conns.get((hdr.dst_port, hdr.src_port))
        if conn is None:
            if hdr.op == P.OP_REQUEST:
                self._guest_connect(hdr)
            elif hdr.op != P.OP_RST:
                self._rst_reply(hdr)
            return
        conn.update_peer(hdr.buf_alloc, hdr.fwd_cnt)
        op = hdr.op
        if op == P.OP_RW:
            if hdr.len:
                _, payload = split(readable, P.HDR_SIZE, hdr.len)
                self._guest_data(conn, payload, hdr.len)
        elif op == P.OP_RESPONSE:
            self._guest_response(conn)
        elif op == P.OP_CREDIT_REQUEST:
            self.send_ctrl(conn.header(P.OP_CREDIT_UPDATE))
        elif op == P.OP_SHUTDOWN:
            self._guest_shutdown(conn, hdr.flags & P.SHUTDOWN_BOTH)
        elif op == P.OP_RST:
            log.debug("%r: reset by guest", conn)
            self._close(conn)
        elif op != P.OP_CREDIT_UPDATE:
            self._close(conn, rst=True)
            return
        if conn.state is not State.CLOSED:
            self._update(conn)

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
        self._update(conn)

    def _guest_response(self, conn: Connection) -> None:
        if conn.state is not State.CONNECTING:
            self._close(conn, rst=True)
            return
        conn.state = State.ESTABLISHED
        if conn.timer is not None:
            self.loop.cancel(conn.timer)
            conn.timer = None
        if conn.hybrid:
            try:
                conn.sock.send(f"OK {conn.host_port}\n".encode())
            except OSError:
                self._close(conn, rst=True)

    def _guest_data(self, conn: Connection, payload: list[memoryview], n: int) -> None:
        if conn.state is not State.ESTABLISHED or conn.peer_shutdown & P.SHUTDOWN_SEND:
            self._close(conn, rst=True)
            return
        if not conn.on_received(n):
            log.warning("%r: guest overran our credit", conn)
        self.stats["tx_bytes"] += n
        if conn.pending:
            for v in payload:
                conn.pending += v
            return
        try:
            sent = conn.sock.send(payload[0]) if len(payload) == 1 else conn.sock.sendmsg(payload)
        except BlockingIOError:
            sent = 0
        except OSError as e:
            log.debug("%r: host write failed: %s", conn, e)
            self._close(conn, rst=True)
            return
        conn.on_forwarded(sent)
        if sent < n:
            skip = sent
            for v in payload:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                conn.pending += v[skip:]
                skip = 0
        if conn.needs_credit_update():
            self.send_ctrl(conn.header(P.OP_CREDIT_UPDATE))

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        new = flags & ~conn.peer_shutdown
        conn.peer_shutdown |= flags
        if new & P.SHUTDOWN_RCV:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RD)
        if not conn.pending:
            self._flushed(conn)

    def _flushed(self, conn: Connection) -> None:
        """Everything the guest sent has reached the host socket."""
        if conn.peer_shutdown == P.SHUTDOWN_BOTH:
            self._close(conn, rst=True)  # Linux waits for this RST after close()
            return
        if conn.peer_shutdown & P.SHUTDOWN_SEND and not conn.host_wr_shut:
            conn.host_wr_shut = True
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            if conn.host_eof:
                self._close(conn)

    def _host_writable(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.pending)
        except BlockingIOError:
            return
        except OSError as e:
            log.debug("%r: host write failed: %s", conn, e)
            self._close(conn, rst=True)
            return
        del conn.pending[:sent]
        conn.on_forwarded(sent)
        if conn.needs_credit_update():
            self.send_ctrl(conn.header(P.OP_CREDIT_UPDATE))
        if not conn.pending:
            self._flushed(conn)
        if conn.state is not State.CLOSED:
            self._update(conn)

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
        self._update(conn)

    def _connect_timeout(self, conn: Connection) -> None:
        conn.timer = None
        if conn.state is State.CONNECTING:
            log.info("%r: connect timed out", conn)
            self._close(conn, rst=True)

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
        conn.on_read = lambda: self._host_readable(conn)
        conn.on_write = lambda: self._host_writable(conn)
        self.conns[conn.key] = conn
        self.stats["conns_total"] += 1
        return conn

    def _update(self, conn: Connection) -> None:
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
            self._close(conn, rst=True)

    def _close(self, conn: Connection, *, rst: bool = False) -> None:
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
        conn.pending = bytearray()
