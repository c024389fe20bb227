"""The device against a fake guest driver: packets, credit, shutdown, and malformed input."""

from __future__ import annotations

import socket

import pytest

from criv.vsock import packet as P
from criv.vsock.device import RX, TX
from criv.vsock.virtqueue import DESC_F_NEXT
from tests.unit.vsock.vsock_fakes import CID, GUEST_PORT, FakeDriver, Guest, connect


def test_guest_connect_and_data_both_ways(guest: Guest) -> None:
    c = connect(guest)
    guest.send(P.OP_RW, payload=b"hello host")
    assert c.recv(100) == b"hello host"
    c.sendall(b"hello guest")
    guest.spin()
    pkts = guest.recv()
    assert [(h.op, d) for h, d in pkts] == [(P.OP_RW, b"hello guest")]
    assert pkts[0][0].src_cid == P.HOST_CID and pkts[0][0].dst_cid == CID
    stats = guest.dev.stats
    assert (stats["rx_bytes"], stats["tx_bytes"], stats["conns_total"]) == (11, 10, 1)


def test_unknown_connection_gets_rst(guest: Guest) -> None:
    guest.send(P.OP_RW, payload=b"x", port=99)
    ((hdr, _),) = guest.recv()
    assert hdr.op == P.OP_RST and hdr.dst_port == GUEST_PORT and hdr.src_port == 99
    guest.send(P.OP_REQUEST, port=98)  # nothing listens on <uds>_98
    ((hdr, _),) = guest.recv()
    assert hdr.op == P.OP_RST
    guest.send(P.OP_RST, port=97)  # an RST is never answered
    assert guest.recv() == []


def test_credit_limits_host_to_guest(guest: Guest) -> None:
    c = connect(guest, buf_alloc=10000)
    c.sendall(b"a" * 30000)
    guest.spin()
    pkts = guest.recv()
    assert sum(len(d) for h, d in pkts if h.op == P.OP_RW) == 10000
    assert pkts[-1][0].op == P.OP_CREDIT_REQUEST
    guest.spin()
    assert guest.recv() == []  # no credit, nothing more
    guest.send(P.OP_CREDIT_UPDATE, buf_alloc=10000)  # consumed all 10000
    guest.spin()
    assert sum(len(d) for h, d in guest.recv() if h.op == P.OP_RW) == 10000


def test_credit_update_to_guest(guest: Guest) -> None:
    c = connect(guest)
    # 64 KiB buf_alloc on our side: after more than half of it is forwarded we announce
    for _ in range(9):
        guest.send(P.OP_RW, payload=b"z" * 4096)
    got = 0
    while got < 9 * 4096:
        got += len(c.recv(65536))
    updates = [h for h, _ in guest.recv() if h.op == P.OP_CREDIT_UPDATE]
    assert updates and updates[-1].fwd_cnt == 9 * 4096 and updates[-1].buf_alloc == 64 * 1024
    guest.send(P.OP_CREDIT_REQUEST)
    ((hdr, _),) = guest.recv()
    assert hdr.op == P.OP_CREDIT_UPDATE


def test_shutdown_semantics(guest: Guest) -> None:
    c = connect(guest)
    guest.send(P.OP_SHUTDOWN, flags=P.SHUTDOWN_SEND)
    assert c.recv(10) == b""  # host sees EOF, can still send
    c.sendall(b"late")
    guest.spin()
    assert [(h.op, d) for h, d in guest.recv()] == [(P.OP_RW, b"late")]
    c.shutdown(socket.SHUT_WR)
    guest.spin()
    ((hdr, _),) = guest.recv()
    assert hdr.op == P.OP_SHUTDOWN and hdr.flags == P.SHUTDOWN_SEND
    # both directions done: the connection is forgotten, the guest's close gets an RST
    assert not guest.dev.conns
    guest.send(P.OP_SHUTDOWN, flags=P.SHUTDOWN_BOTH)
    ((hdr, _),) = guest.recv()
    assert hdr.op == P.OP_RST


def test_guest_close_gets_rst_and_host_eof(guest: Guest) -> None:
    c = connect(guest)
    guest.send(P.OP_RW, payload=b"bye")
    guest.send(P.OP_SHUTDOWN, flags=P.SHUTDOWN_BOTH)
    assert c.recv(10) == b"bye"
    assert c.recv(10) == b""
    ((hdr, _),) = guest.recv()
    assert hdr.op == P.OP_RST


def test_guest_rst_closes_host_socket(guest: Guest) -> None:
    c = connect(guest)
    guest.send(P.OP_RST)
    assert c.recv(10) == b""
    assert not guest.dev.conns


def test_host_connect_handshake(guest: Guest) -> None:
    a, b = socket.socketpair()
    guest.dev.host_connect(a, 1000, hybrid=True)
    ((hdr, _),) = guest.recv()
    assert hdr.op == P.OP_REQUEST and hdr.dst_port == 1000 and hdr.src_port >= 1 << 30
    resp = P.Header(
        CID, P.HOST_CID, 1000, hdr.src_port, 0, P.TYPE_STREAM, P.OP_RESPONSE, 0, 4096, 0
    )
    guest.tx.add([resp.pack()])
    guest.dev.kick(TX)
    b.settimeout(5)
    assert b.recv(100) == f"OK {hdr.src_port}\n".encode()


def test_bad_source_cid_is_dropped(guest: Guest) -> None:
    guest.send(P.OP_REQUEST, src_cid=7)
    assert guest.recv() == []
    assert guest.dev.broken is None


# -- malformed input: the device goes broken, never crashes or hangs ----------------------
@pytest.mark.timeout(10)
def test_tx_descriptor_loop_breaks_device(guest: Guest) -> None:
    c = connect(guest)
    a = guest.mem.alloc(64)
    guest.tx.set_desc(40, a, 64, DESC_F_NEXT, 41)
    guest.tx.set_desc(41, a, 64, DESC_F_NEXT, 40)
    guest.tx.publish(40)
    guest.dev.kick(TX)
    assert guest.dev.broken is not None and "loop" in guest.dev.broken
    assert c.recv(10) == b""  # host connections are dropped
    # further kicks are ignored
    guest.send(P.OP_REQUEST)
    guest.dev.kick(RX)
    assert guest.rx.take_used() == []


@pytest.mark.timeout(10)
def test_wrong_length_breaks_device(guest: Guest) -> None:
    guest.send(P.OP_RW, payload=b"abc", length=5000)
    assert guest.dev.broken is not None and "claims" in guest.dev.broken


@pytest.mark.timeout(10)
def test_short_header_breaks_device(guest: Guest) -> None:
    guest.tx.add([b"short"])
    guest.dev.kick(TX)
    assert guest.dev.broken is not None


@pytest.mark.timeout(10)
def test_rx_buffer_out_of_range_breaks_device(guest: Guest) -> None:
    guest.rx.take_used()
    # poison the next rx chain's header descriptor
    head = guest.rx.avail_idx
    guest.rx.set_desc(60, 0xDEAD0000000, 44, 2, 0)
    guest.rx.publish(60)
    del head
    # drain the 16 good ones first with RSTs, then hit the bad one
    for p in range(17):
        guest.send(P.OP_RW, port=300 + p, payload=b"x")
    assert guest.dev.broken is not None and "rx queue" in guest.dev.broken
    a, b = socket.socketpair()
    guest.dev.host_connect(a, 1000, hybrid=True)
    b.settimeout(2)
    assert b.recv(10) == b""  # refused while broken


def test_restart_clears_broken(guest: Guest) -> None:
    guest.tx.add([b"short"])
    guest.dev.kick(TX)
    assert guest.dev.broken
    guest.dev.stop_queue(RX)
    guest.dev.stop_queue(TX)
    rx = FakeDriver(guest.mem, num=8)
    rx.add([P.HDR_SIZE, 4096])
    guest.dev.start_queue(RX, rx.device_queue())
    assert guest.dev.broken is None
