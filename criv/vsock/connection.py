"""One vsock stream between a host unix socket and a guest port: state and credit accounting.

Credit-based flow control as in Linux net/vmw_vsock/virtio_transport_common.c: each side
advertises ``buf_alloc`` (its receive buffer) and ``fwd_cnt`` (bytes it has consumed) in every
header; a sender may have at most ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes in flight.
This module holds only the bookkeeping; the device does the I/O.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Callable

from criv.vsock import packet as P

DEFAULT_BUF_ALLOC = 256 * 1024


class State(enum.Enum):
    CONNECTING = "connecting"  # host-initiated, REQUEST sent, waiting for RESPONSE
    ESTABLISHED = "established"
    CLOSED = "closed"


class Connection:
    """Host side ``host_port`` (our local vsock port on CID 2) <-> guest ``guest_port``."""

    def __init__(
        self,
        sock: socket.socket,
        host_port: int,
        guest_port: int,
        guest_cid: int,
        *,
        state: State,
        hybrid: bool = False,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
    ) -> None:
        self.sock = sock
        self.host_port = host_port
        self.guest_port = guest_port
        self.guest_cid = guest_cid
        self.state = state
        self.hybrid = hybrid  # answer "OK <port>\n" on RESPONSE
        # host -> guest direction (we are the sender)
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tx_cnt = 0
        self.credit_requested = False
        self.read_hint = 1  # bytes to make room for at the next host read (see hostread)
        # guest -> host direction (we are the receiver)
        self.buf_alloc = buf_alloc
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.last_fwd_cnt = 0  # fwd_cnt last advertised to the guest
        self.pending = bytearray()  # received from the guest, not yet written to the host socket
        # shutdown state
        self.peer_shutdown = 0  # SHUTDOWN_* flags received from the guest
        self.host_eof = False  # host socket read side finished; SHUTDOWN(SEND) sent to guest
        self.host_wr_shut = False  # shutdown(SHUT_WR) done on the host socket
        # owned by the device
        self.timer: int | None = None
        self.on_read: Callable[[], None] | None = None
        self.on_write: Callable[[], None] | None = None
        # owned by the stall monitor (criv.vsock.health)
        self.progress: tuple[int, int, int] = (0, 0, 0)
        self.progress_at = 0.0
        self.stalled = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    # -- sending to the guest --------------------------------------------------------
    def peer_credit(self) -> int:
        # the counters are u32 on the wire and wrap
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF
        return max(0, self.peer_buf_alloc - in_flight)

    def update_peer(self, buf_alloc: int, fwd_cnt: int) -> None:
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt
        if self.peer_credit() > 0:
            self.credit_requested = False

    def on_sent(self, n: int) -> None:
        self.tx_cnt += n

    # -- receiving from the guest ----------------------------------------------------
    def on_received(self, n: int) -> bool:
        """Account ``n`` payload bytes from the guest; False if the guest overran our credit
        (it may have at most ``buf_alloc`` bytes not yet forwarded to the host socket)."""
        self.rx_cnt += n
        return self.rx_cnt - self.fwd_cnt <= self.buf_alloc

    def on_forwarded(self, n: int) -> None:
        self.fwd_cnt += n

    def needs_credit_update(self) -> bool:
        """Announce our progress once the guest has used half of the window it may have in
        flight. Linux (6.1 as Debian ships it) keeps at most the smaller of our buf_alloc and
        its own socket's buffer in flight, and says its own in every header: half of ours
        alone could wait for data a guest with a small socket buffer never sends."""
        if self.fwd_cnt == self.last_fwd_cnt:
            return False
        window = min(self.buf_alloc, self.peer_buf_alloc or self.buf_alloc)
        return self.rx_cnt - self.last_fwd_cnt > window - window // 2

    # -- headers ---------------------------------------------------------------------
    def _fields(self, op: int, length: int, flags: int) -> tuple[int, ...]:
        """A header's fields in wire order; it carries our credit, so it is noted as sent."""
        self.last_fwd_cnt = self.fwd_cnt
        return (
            P.HOST_CID, self.guest_cid, self.host_port, self.guest_port, length,
            P.TYPE_STREAM, op, flags, self.buf_alloc, self.fwd_cnt & 0xFFFFFFFF,
        )  # fmt: skip

    def header(self, op: int, length: int = 0, flags: int = 0) -> P.Header:
        return P.Header(*self._fields(op, length, flags))

    def pack_rw_header(self, view: memoryview, length: int) -> None:
        """``header(OP_RW, length)`` written straight into a 44-byte guest buffer."""
        P.HDR.pack_into(view, 0, *self._fields(P.OP_RW, length, 0))

    def want_host_read(self) -> bool:
        """Should we read from the host socket (data for the guest) now?"""
        return (
            self.state is State.ESTABLISHED
            and not self.host_eof
            and not self.peer_shutdown & P.SHUTDOWN_RCV
            and self.peer_credit() > 0
        )

    def counters(self) -> str:
        """Every credit counter, for stall and overrun reports."""
        return (
            f"buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt} rx_cnt={self.rx_cnt}"
            f" tx_cnt={self.tx_cnt} peer_buf_alloc={self.peer_buf_alloc}"
            f" peer_fwd_cnt={self.peer_fwd_cnt} credit={self.peer_credit()}"
            f" credit_requested={self.credit_requested} pending={len(self.pending)}"
            f" peer_shutdown={self.peer_shutdown} host_eof={self.host_eof}"
        )

    def __repr__(self) -> str:
        return (
            f"<Connection {self.host_port}<->{self.guest_cid}:{self.guest_port} {self.state.value}"
            f" tx={self.tx_cnt} credit={self.peer_credit()} rx={self.rx_cnt} fwd={self.fwd_cnt}>"
        )
