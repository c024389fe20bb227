"""Batched host reads into several rx buffers, and the coalesced tx interrupt."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from criv.vsock import packet as P
from criv.vsock.notify import RX, TX, TX_SIGNAL_DELAY, TX_SIGNAL_FRACTION
from tests.unit.vsock.vsock_fakes import Guest, connect

ONE = (1).to_bytes(8, "little")


def test_one_host_read_fills_several_rx_buffers_in_order(guest: Guest) -> None:
    c = connect(guest)
    guest.recv()
    data = bytes(range(256)) * 40  # 10240 bytes: two full 4 KiB buffers and part of a third
    c.sendall(data)
    got: list[tuple[P.Header, bytes]] = []
    for _ in range(20):
        guest.spin(1)
        got += guest.recv()
        if sum(len(b) for _, b in got) >= len(data):
            break
    assert b"".join(b for _, b in got) == data
    assert all(h.op == P.OP_RW and h.len == len(b) for h, b in got)
    assert [h.len for h, _ in got][:2] == [4096, 4096]
    # buffers that were popped but not filled went back to the ring, in order
    c.sendall(b"next")
    guest.spin(2)
    ((hdr, body),) = guest.recv()
    assert body == b"next" and hdr.len == 4
    rx = guest.dev.queues[RX]
    assert rx.used_idx == rx.last_avail


def test_small_reads_take_one_rx_buffer(guest: Guest) -> None:
    c = connect(guest)
    guest.recv()
    rx = guest.dev.queues[RX]
    for i in range(5):
        c.sendall(b"x" * 64)
        guest.spin(2)
        ((_, body),) = guest.recv()
        assert body == b"x" * 64, i
        assert rx.used_idx == rx.last_avail  # nothing popped beyond what was filled


@pytest.fixture
def tx_call(guest: Guest) -> Iterator[int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    guest.dev.set_call(TX, w)
    yield r
    guest.dev.set_call(TX, None)
    os.close(r)


def test_tx_interrupt_is_held_back_briefly(guest: Guest, tx_call: int) -> None:
    ls = connect(guest)
    guest.send(P.OP_RW, payload=b"hello")
    guest.loop.run_once(0)
    with pytest.raises(BlockingIOError):
        os.read(tx_call, 8)
    assert ls.recv(5) == b"hello"  # the data itself was not held back
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        guest.loop.run_once(TX_SIGNAL_DELAY)
        try:
            assert os.read(tx_call, 8) == ONE
            return
        except BlockingIOError:
            continue
    pytest.fail("tx interrupt never sent")


def test_tx_interrupt_goes_at_once_when_a_quarter_of_the_ring_waits(
    guest: Guest, tx_call: int
) -> None:
    ls = connect(guest)
    guest.loop.run_once(0)
    guest.loop.run_once(2 * TX_SIGNAL_DELAY)  # the REQUEST's interrupt
    with pytest.raises(BlockingIOError):
        while True:
            os.read(tx_call, 8)
    num = guest.tx.num
    for _ in range(num // TX_SIGNAL_FRACTION // 2):  # two descriptors a packet
        guest.tx.add([P.Header(3, 2, 1234, 77, 1, 1, P.OP_RW, 0, 1 << 18, 0).pack(), b"y"])
    guest.dev.kick(TX)
    guest.loop.run_once(0)
    assert os.read(tx_call, 8) == ONE
    assert ls.recv(64) == b"y" * (num // TX_SIGNAL_FRACTION // 2)
