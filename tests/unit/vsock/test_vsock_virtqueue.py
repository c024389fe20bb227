from __future__ import annotations

import mmap
import subprocess
import sys
from pathlib import Path

import pytest

from criv.vsock.memory import AddressError, MemoryMap, Region
from criv.vsock.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    VirtQueue,
    VirtQueueError,
)
from tests.unit.vsock.vsock_fakes import GPA_BASE, MEM_SIZE, FakeDriver, GuestMemory


@pytest.fixture
def drv() -> FakeDriver:
    return FakeDriver(GuestMemory(), num=8)


def test_memory_translation() -> None:
    buf = bytearray(4096)
    m = MemoryMap.from_buffers([(0x1000, 0x9000, buf)])
    m.gpa(0x1000, 4096)[0:3] = b"abc"
    assert bytes(m.uva(0x9000, 3)) == b"abc"
    for addr, n in [(0xFFF, 1), (0x1000, 4097), (0x2000, 1), (2**64 - 1, 2)]:
        with pytest.raises(AddressError):
            m.gpa(addr, n)
    with pytest.raises(AddressError):
        m.uva(0x1000, 1)


def test_pop_readable_and_writable(drv: FakeDriver) -> None:
    vq = drv.device_queue()
    assert vq.pop() is None
    head = drv.add([b"hdr", b"payload", 10, 20])
    chain = vq.pop()
    assert chain is not None and chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"hdr", b"payload"]
    assert [len(v) for v in chain.writable] == [10, 20]
    chain.writable[0][:2] = b"ok"
    vq.push(chain.head, 2)
    assert drv.take_used() == [(head, 2, b"ok")]
    assert vq.pop() is None


def test_unpop_and_index_wrap(drv: FakeDriver) -> None:
    vq = drv.device_queue()
    drv.avail_idx = vq.last_avail = 0xFFFE
    for i in range(4):
        drv.add([bytes([i])])
        chain = vq.pop()
        assert chain is not None
        if i == 2:
            vq.unpop()
            chain = vq.pop()
            assert chain is not None
        assert bytes(chain.readable[0]) == bytes([i])
        vq.push(chain.head, 0)
        drv.take_used()
    assert vq.last_avail == 2


def test_loop_is_an_error(drv: FakeDriver) -> None:
    vq = drv.device_queue()
    a = drv.mem.alloc(8)
    drv.set_desc(0, a, 8, DESC_F_NEXT, 1)
    drv.set_desc(1, a, 8, DESC_F_NEXT, 0)
    drv.publish(0)
    with pytest.raises(VirtQueueError, match="loop"):
        vq.pop()


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda d, a: d.set_desc(0, GPA_BASE + MEM_SIZE - 4, 8, 0, 0), "not mapped"),
        (lambda d, a: d.set_desc(0, 0, 8, 0, 0), "not mapped"),
        (lambda d, a: d.set_desc(0, a, 2**32 - 1, 0, 0), "not mapped"),
        (lambda d, a: d.set_desc(0, a, 8, DESC_F_NEXT, 99), "next"),
        (lambda d, a: d.set_desc(0, a, 8, DESC_F_INDIRECT, 0), "indirect"),
        (
            lambda d, a: (
                d.set_desc(0, a, 8, DESC_F_WRITE | DESC_F_NEXT, 1),
                d.set_desc(1, a, 8, 0, 0),
            ),
            "readable after writable",
        ),
    ],
)
def test_malformed_descriptors(drv: FakeDriver, setup: object, match: str) -> None:
    vq = drv.device_queue()
    setup(drv, drv.mem.alloc(8))  # type: ignore[operator]
    drv.publish(0)
    with pytest.raises(VirtQueueError, match=match):
        vq.pop()


def test_head_out_of_range(drv: FakeDriver) -> None:
    vq = drv.device_queue()
    drv.publish(200)
    with pytest.raises(VirtQueueError, match="head index"):
        vq.pop()


def test_avail_index_jump(drv: FakeDriver) -> None:
    vq = drv.device_queue()
    drv.avail_idx = 100
    drv.publish(0)
    with pytest.raises(VirtQueueError, match="avail idx"):
        vq.pop()


def test_ring_outside_memory() -> None:
    m = GuestMemory()
    with pytest.raises(VirtQueueError):
        from criv.vsock.virtqueue import VirtQueue

        VirtQueue(m.map, 8, 0x1, 0x2, 0x3)
    with pytest.raises(VirtQueueError, match="queue size"):
        FakeDriver(m, num=6).device_queue()


def test_interrupt_flag(drv: FakeDriver) -> None:
    vq = drv.device_queue()
    assert vq.needs_interrupt()
    drv.mem.write(drv.avail, b"\x01\x00")  # VRING_AVAIL_F_NO_INTERRUPT
    assert not vq.needs_interrupt()
    drv.add([8])
    assert vq.pop() is not None
    assert drv.mem.read(drv.used, 2) == b"\x00\x00"  # we never ask the driver not to kick


_WATCHER = """
import mmap, sys
f = open(sys.argv[1], "r+b")
w = memoryview(mmap.mmap(f.fileno(), 0)).cast("H")
num, used = int(sys.argv[2]), int(sys.argv[3]) // 2
prev, bad = w[used + 1], 0
print("ready", flush=True)
while w[0] != 0xDEAD:
    idx = w[used + 1]
    if idx < prev:  # went backwards (the pusher stops short of a wrap): not one store
        bad += 1
    elif idx != prev and w[used + 2 + 4 * ((idx - 1) % num)] != (idx - 1) % num:
        bad += 1  # published before its entry
    prev = idx
print(bad)
"""


@pytest.mark.timeout(60)
def test_used_idx_is_published_in_one_store(tmp_path: Path) -> None:
    """The guest reads used->idx while we write it.  Each value it can see must be one we
    published after its entry (a transient 0 made a TCG guest consume unfilled slots).
    The index never wraps here, so any step down is a store seen in pieces, however long
    the watcher is kept off a CPU (with modular steps, a watcher that missed 32768 pushes
    on a busy machine read the index as having gone back)."""
    num, used = 128, 4096
    path = tmp_path / "ring"
    path.write_bytes(bytes(8192))
    with path.open("r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
    mem = MemoryMap([Region(0, 8192, 0, memoryview(m), m)])
    vq = VirtQueue(mem, num, 0, 2048, used, user=False)
    watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(path), str(num), str(used)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert watcher.stdout is not None and watcher.stdout.readline() == "ready\n"
    for i in range(0xFFFF):
        vq.push(i % num, 44)
    memoryview(m).cast("H")[0] = 0xDEAD
    out, _ = watcher.communicate(timeout=30)
    assert out.strip() == "0"
    mem.close()
