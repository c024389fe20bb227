"""What a hostile or stuck guest cannot do to the backend: hold memory past the credit it was
given or past the device cap, lose an interrupt for good, or stall a stream silently."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from criv.vsock import packet as P
from criv.vsock.connection import Connection
from criv.vsock.device import RESIGNAL_AFTER, RX
from criv.vsock.health import STALL_AFTER
from tests.unit.vsock.vsock_fakes import Guest, connect

BUF = 64 * 1024  # the fake guest's device advertises this buf_alloc


def only_conn(g: Guest, port: int = 77) -> Connection:
    (conn,) = [c for c in g.dev.conns.values() if c.host_port == port]
    return conn


def choke(conn: Connection) -> None:
    """Make the backend's end of the host socket take almost nothing more."""
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


def flood(g: Guest, port: int, chunks: int) -> list[P.Header]:
    """Send up to ``chunks`` x 4 KiB ignoring credit, until reset; what came back."""
    out: list[P.Header] = []
    for _ in range(chunks):
        g.send(P.OP_RW, port=port, payload=b"x" * 4096)
        out += [h for h, _ in g.recv()]
        assert g.dev.writer.buffered <= g.dev.writer.max_buffered
        if out and out[-1].op == P.OP_RST:
            break
    return out


def test_guest_beyond_credit_is_reset(guest: Guest, caplog: pytest.LogCaptureFixture) -> None:
    c = connect(guest)
    conn = only_conn(guest)
    choke(conn)
    got = flood(guest, 77, 8)  # 32 KiB: within credit, held or not
    assert P.OP_RST not in [h.op for h in got] and guest.dev.conns
    assert len(conn.pending) <= BUF
    got = flood(guest, 77, 40)  # far past 64 KiB not yet forwarded
    assert [h.op for h in got].count(P.OP_RST) == 1
    assert not guest.dev.conns and guest.dev.writer.buffered == 0
    assert guest.dev.stats["credit_overruns"] == 1
    assert "beyond the credit" in caplog.text and "buf_alloc=65536" in caplog.text
    c.settimeout(5)
    data = b""
    while chunk := c.recv(65536):  # what was forwarded, then EOF: the stream is gone
        data += chunk
    assert 0 < len(data) < 48 * 4096


def test_device_cap_resets_the_stream_that_passes_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    g = Guest(tmp_path, max_buffered=100_000)
    try:
        c1 = connect(g, port=77)
        c2 = connect(g, port=78)
        a, b = only_conn(g, 77), only_conn(g, 78)
        choke(a)
        choke(b)
        # both respect credit: each may hold up to 64 KiB, together more than the cap
        assert P.OP_RST not in [h.op for h in flood(g, 77, 15)]
        assert len(a.pending) > 40_000
        got = flood(g, 78, 15)
        assert [h.op for h in got].count(P.OP_RST) == 1
        assert list(g.dev.conns.values()) == [a]  # the first stream is untouched
        assert g.dev.writer.buffered == len(a.pending) <= 100_000
        assert g.dev.stats["buffer_cap_resets"] == 1
        assert "device cap 100000" in caplog.text
        del c1, c2
    finally:
        g.dev.reset_all("test end")
        g.loop.close()


def test_held_bytes_are_released_when_the_host_reads(guest: Guest) -> None:
    c = connect(guest)
    choke(only_conn(guest))
    flood(guest, 77, 10)
    assert guest.dev.writer.buffered > 0
    c.settimeout(5)
    got = 0
    while got < 10 * 4096:
        got += len(c.recv(65536))
        guest.spin(2)
    assert guest.dev.writer.buffered == 0
    conn = only_conn(guest)
    assert conn.fwd_cnt == 10 * 4096
    # what we last told the guest lets it send at least half a buffer more
    assert BUF - (conn.rx_cnt - conn.last_fwd_cnt) >= BUF // 2


def test_interrupt_the_driver_had_off_is_sent_once_it_is_on(guest: Guest) -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    guest.dev.set_call(RX, w)
    try:
        guest.mem.write(guest.rx.avail, b"\x01\x00")  # VRING_AVAIL_F_NO_INTERRUPT
        guest.send(P.OP_RW, port=99, payload=b"x")  # unknown stream: an RST into rx
        guest.spin(1)
        with pytest.raises(BlockingIOError):
            os.read(r, 8)
        assert guest.dev.held[RX]
        guest.mem.write(guest.rx.avail, b"\x00\x00")  # the driver switches interrupts on
        for _ in range(int(RESIGNAL_AFTER / 0.01) + 20):
            guest.loop.run_once(0.01)
            if not guest.dev.held[RX]:
                break
        assert os.read(r, 8) == (1).to_bytes(8, "little")
        assert guest.dev.stats["interrupts_resent"] == 1
    finally:
        guest.dev.set_call(RX, None)
        os.close(r)


def test_stalled_stream_is_reported_and_credit_asked_again(
    guest: Guest, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    guest.dev.monitor.clock = lambda: now[0]
    c = connect(guest, buf_alloc=1000)
    c.sendall(b"a" * 5000)
    guest.spin()
    pkts = [h for h, _ in guest.recv()]
    assert pkts[-1].op == P.OP_CREDIT_REQUEST  # 1000 bytes sent, then out of credit
    caplog.set_level(logging.INFO, "criv.vsock")
    guest.dev.monitor.check()
    now[0] += STALL_AFTER - 1
    guest.dev.monitor.check()
    assert "stalled" not in caplog.text and guest.recv() == []
    now[0] += 2
    guest.dev.monitor.check()
    assert "stalled" in caplog.text and "waits for guest credit" in caplog.text
    for counter in ("peer_buf_alloc=1000", "tx_cnt=1000", "credit=0", "rx avail="):
        assert counter in caplog.text
    assert [h.op for h, _ in guest.recv()] == [P.OP_CREDIT_REQUEST]  # asked again
    assert guest.dev.stats["stalls"] == 1
    guest.send(P.OP_CREDIT_UPDATE, buf_alloc=1000)  # the guest consumed those 1000 bytes
    guest.spin()
    assert sum(h.len for h, _ in guest.recv() if h.op == P.OP_RW) == 1000
    guest.dev.monitor.check()
    assert "moving again" in caplog.text and not only_conn(guest).stalled


def test_idle_stream_is_not_a_stall(guest: Guest, caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    guest.dev.monitor.clock = lambda: now[0]
    connect(guest)
    for _ in range(5):
        guest.dev.monitor.check()
        now[0] += STALL_AFTER
    assert "stalled" not in caplog.text and guest.dev.stats["stalls"] == 0


def test_a_guest_claiming_a_tiny_or_huge_buffer_moves_only_its_own_credit(guest: Guest) -> None:
    """The credit-update window follows the buf_alloc the guest claims (Linux keeps no more
    than its own buffer in flight). Claiming 1 byte buys at most one update per packet the
    guest itself sends; claiming 4 GiB does not widen our window; and the credit we enforce
    stays our own buf_alloc either way."""
    c = connect(guest, buf_alloc=1)
    conn = only_conn(guest)
    updates = 0
    for _ in range(8):
        guest.send(P.OP_RW, payload=b"x" * 4096, buf_alloc=1)
        updates += sum(h.op == P.OP_CREDIT_UPDATE for h, _ in guest.recv())
    assert 0 < updates <= 8
    assert conn.buf_alloc == BUF
    c.settimeout(5)
    got = 0
    while got < 8 * 4096:
        got += len(c.recv(65536))
    # a huge claim: updates again only at half of our own 64 KiB
    updates = 0
    for _ in range(4):  # 16 KiB, under half of ours
        guest.send(P.OP_RW, payload=b"y" * 4096, buf_alloc=0xFFFFFFFF)
        updates += sum(h.op == P.OP_CREDIT_UPDATE for h, _ in guest.recv())
    assert updates == 0
    # and sending past our credit while the host reads nothing is still a reset
    choke(conn)
    got_back = flood(guest, 77, 40)
    assert [h.op for h in got_back].count(P.OP_RST) == 1
    assert guest.dev.stats["credit_overruns"] == 1
