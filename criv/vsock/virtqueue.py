"""Split virtqueues (virtio 1.x, section 2.7) walked from the device side.

The driver (guest) posts descriptor chains in the avail ring; the device pops them, reads the
device-readable part, fills the device-writable part and returns the head in the used ring.
Every guest-controlled value is checked: an index or address out of range, a chain longer than
the queue (a loop), an indirect descriptor (not negotiated) or a readable descriptor after a
writable one raises ``VirtQueueError``; the caller then marks the device broken.

Ring words shared with the running guest are read and written through native-typed
memoryviews: one aligned load or store per word.  Never ``struct.pack_into`` them: it zeroes
its target before writing, so the driver could read ``used->idx == 0`` in between (for as
long as this process is descheduled there), take that as "more used", and consume ring slots
not filled yet.  Virtio is little-endian; so are the hosts this runs on.
"""

from __future__ import annotations

import struct
import sys
import threading

from criv.vsock.memory import AddressError, MemoryMap
from criv.vsock.record import Record

DESC = struct.Struct("<QIHH")
_DESC_UNPACK = DESC.unpack_from

if sys.byteorder != "little":  # the native-typed ring views below assume it
    raise ImportError("criv.vsock needs a little-endian host")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768


_fence_lock = threading.Lock()


def fence() -> None:
    """Full memory barrier.  The device's "write used idx, then read avail flags" is a store
    followed by a load, which x86 may reorder; a locked instruction (taking a lock) orders
    them, as the driver's virtio_mb() does."""
    _fence_lock.acquire()
    _fence_lock.release()


class VirtQueueError(Exception):
    """The guest put something invalid in a virtqueue; the device must stop using it."""


class Chain(Record):
    __slots__ = ("head", "readable", "writable")

    def __init__(
        self,
        head: int,
        readable: list[memoryview] | None = None,
        writable: list[memoryview] | None = None,
    ) -> None:
        self.head = head
        self.readable: list[memoryview] = [] if readable is None else readable
        self.writable: list[memoryview] = [] if writable is None else writable

    def read_len(self) -> int:
        return sum(len(v) for v in self.readable)

    def write_len(self) -> int:
        return sum(len(v) for v in self.writable)


class VirtQueue:
    def __init__(
        self, mem: MemoryMap, num: int, desc: int, avail: int, used: int, *, user: bool = True
    ) -> None:
        """Addresses are QEMU user addresses (vhost-user) unless ``user`` is False (guest
        physical, used by tests)."""
        if num <= 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise VirtQueueError(f"bad queue size {num}")
        tr = mem.uva if user else mem.gpa
        try:
            self.desc = tr(desc, 16 * num)
            self.avail = tr(avail, 4 + 2 * num + 2)
            self.used = tr(used, 4 + 8 * num + 2)
        except AddressError as e:
            raise VirtQueueError(f"ring not in guest memory: {e}") from e
        if avail % 2 or used % 4:
            raise VirtQueueError("misaligned ring")
        self.mem = mem
        self.num = num
        self.last_avail = 0
        self._avail16 = self.avail.cast("H")  # flags, idx, ring[num], used_event
        self._used16 = self.used[:4].cast("H")  # flags, idx
        self._used32 = self.used[4 : 4 + 8 * num].cast("I")  # (id, len) * num
        self.used_idx = int(self._used16[1])

    def avail_idx(self) -> int:
        return int(self._avail16[1])

    def pending(self) -> int:
        """Number of chains the driver has made available and we have not popped."""
        n = (self.avail_idx() - self.last_avail) & 0xFFFF
        if n > self.num:
            raise VirtQueueError(f"avail idx moved {n} entries, queue has {self.num}")
        return n

    def pop(self) -> Chain | None:
        if not self.pending():
            return None
        head = int(self._avail16[2 + self.last_avail % self.num])
        chain = self._walk(head)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def unpop(self, n: int = 1) -> None:
        """Give back the last ``n`` popped chains (not yet pushed) to be popped again."""
        self.last_avail = (self.last_avail - n) & 0xFFFF

    def _walk(self, head: int) -> Chain:
        num = self.num
        if head >= num:
            raise VirtQueueError(f"head index {head} >= queue size {num}")
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        chain = Chain(head, readable, writable)
        unpack, desc, gpa = _DESC_UNPACK, self.desc, self.mem.gpa
        idx = head
        for _ in range(num):
            addr, length, flags, nxt = unpack(desc, idx << 4)
            if flags & DESC_F_INDIRECT:
                raise VirtQueueError("indirect descriptor (not negotiated)")
            try:
                view = gpa(addr, length)
            except AddressError as e:
                raise VirtQueueError(f"descriptor {idx}: {e}") from e
            if flags & DESC_F_WRITE:
                writable.append(view)
            elif writable:
                raise VirtQueueError(f"descriptor {idx}: readable after writable")
            else:
                readable.append(view)
            if not flags & DESC_F_NEXT:
                return chain
            if nxt >= num:
                raise VirtQueueError(f"descriptor {idx}: next {nxt} >= queue size {num}")
            idx = nxt
        raise VirtQueueError(f"descriptor chain from {head} longer than the queue (loop?)")

    def add_used(self, head: int, written: int) -> None:
        """Fill the next used entry; the driver sees it at the next ``publish()``."""
        slot = (self.used_idx % self.num) << 1
        used32 = self._used32
        used32[slot] = head
        used32[slot + 1] = written
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish(self) -> None:
        """Make every used entry added so far visible: one store of the used index (x86 keeps
        stores in order, so the entries are visible first)."""
        self._used16[1] = self.used_idx

    def push(self, head: int, written: int) -> None:
        self.add_used(head, written)
        self._used16[1] = self.used_idx

    def needs_interrupt(self) -> bool:
        fence()
        return not self._avail16[0] & AVAIL_F_NO_INTERRUPT
