from __future__ import annotations

import socket

from criv.vsock import packet as P
from criv.vsock.connection import Connection, State


def make(buf_alloc: int = 1000) -> Connection:
    a, _b = socket.socketpair()
    return Connection(a, 1 << 30, 1000, 3, state=State.ESTABLISHED, buf_alloc=buf_alloc)


def test_peer_credit() -> None:
    c = make()
    assert c.peer_credit() == 0 and not c.want_host_read()
    c.update_peer(4096, 0)
    assert c.peer_credit() == 4096 and c.want_host_read()
    c.on_sent(4000)
    assert c.peer_credit() == 96
    c.on_sent(96)
    assert c.peer_credit() == 0 and not c.want_host_read()
    c.update_peer(4096, 4096)
    assert c.peer_credit() == 4096


def test_peer_credit_wraps_u32() -> None:
    c = make()
    c.tx_cnt = 2**32 + 100  # we sent more than 4 GiB
    c.update_peer(1000, 50)  # the guest's fwd_cnt wrapped too
    assert c.peer_credit() == 950
    c.update_peer(1000, 2**32 - 10)  # fwd_cnt just before the wrap: 110 in flight
    assert c.peer_credit() == 890


def test_credit_update_threshold() -> None:
    c = make(buf_alloc=1000)
    assert c.on_received(400)
    c.on_forwarded(400)
    assert not c.needs_credit_update()  # guest still sees 600 free
    assert c.on_received(200)
    c.on_forwarded(200)
    assert c.needs_credit_update()  # guest sees 400 < 500 free
    h = c.header(P.OP_CREDIT_UPDATE)
    assert h.fwd_cnt == 600 and h.buf_alloc == 1000
    assert not c.needs_credit_update()
    assert not c.on_received(1001)  # overrun detected


def test_credit_update_comes_within_a_smaller_guest_window() -> None:
    """Linux keeps at most its own socket buffer in flight (its buf_alloc, in every header
    it sends): the update is due at half of that, not at half of ours."""
    c = make(buf_alloc=1000)
    c.update_peer(200, 0)
    assert c.on_received(100)
    c.on_forwarded(100)
    assert not c.needs_credit_update()  # half of the guest's 200 not passed yet
    assert c.on_received(10)
    c.on_forwarded(10)
    assert c.needs_credit_update()
    c.header(P.OP_CREDIT_UPDATE)
    c.update_peer(5000, 0)  # a bigger guest buffer: ours is the window again
    assert c.on_received(400)
    c.on_forwarded(400)
    assert not c.needs_credit_update()


def test_header_and_shutdown_gate() -> None:
    c = make()
    c.update_peer(10, 0)
    h = c.header(P.OP_RW, 5)
    assert (h.src_cid, h.dst_cid, h.src_port, h.dst_port, h.len, h.type) == (
        2,
        3,
        1 << 30,
        1000,
        5,
        P.TYPE_STREAM,
    )
    assert P.Header.unpack(h.pack()) == h
    c.peer_shutdown = P.SHUTDOWN_RCV
    assert not c.want_host_read()
