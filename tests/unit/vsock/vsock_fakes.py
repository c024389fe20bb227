"""A fake guest driver for split virtqueues over a bytearray "guest memory"."""

from __future__ import annotations

import struct

from criv.vsock.memory import MemoryMap
from criv.vsock.virtqueue import DESC, DESC_F_NEXT, DESC_F_WRITE, VirtQueue

GPA_BASE = 0x10000
UVA_BASE = 0x7F0000000000
MEM_SIZE = 4 << 20
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")


class GuestMemory:
    def __init__(self, size: int = MEM_SIZE) -> None:
        self.buf = bytearray(size)
        self.map = MemoryMap.from_buffers([(GPA_BASE, UVA_BASE, self.buf)])
        self.next = 0

    def alloc(self, n: int, align: int = 16) -> int:
        """Guest-physical address of ``n`` fresh bytes."""
        self.next = (self.next + align - 1) // align * align
        off = self.next
        self.next += n
        assert self.next <= len(self.buf)
        return GPA_BASE + off

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - GPA_BASE
        self.buf[off : off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        off = gpa - GPA_BASE
        return bytes(self.buf[off : off + n])


class FakeDriver:
    """The guest's half of one split virtqueue."""

    def __init__(self, mem: GuestMemory, num: int = 16) -> None:
        self.mem = mem
        self.num = num
        self.desc = mem.alloc(16 * num)
        self.avail = mem.alloc(6 + 2 * num)
        self.used = mem.alloc(6 + 8 * num, align=4)
        self.free = list(range(num))
        self.avail_idx = 0
        self.last_used = 0
        self.bufs: dict[int, list[tuple[int, int, bool]]] = {}

    def device_queue(self) -> VirtQueue:
        """The device's view, addressed the way vhost-user passes it (QEMU user addresses)."""
        u = UVA_BASE - GPA_BASE
        return VirtQueue(self.mem.map, self.num, self.desc + u, self.avail + u, self.used + u)

    def set_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(self.desc + 16 * i, DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.num), U16.pack(head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, U16.pack(self.avail_idx))

    def add(self, segments: list[bytes | int]) -> int:
        """Post a chain: bytes = device-readable segment, int = device-writable of that size."""
        idxs = [self.free.pop(0) for _ in segments]
        parts = []
        for k, (i, seg) in enumerate(zip(idxs, segments, strict=True)):
            writable = isinstance(seg, int)
            n = seg if isinstance(seg, int) else len(seg)
            addr = self.mem.alloc(max(n, 1))
            if isinstance(seg, bytes):
                self.mem.write(addr, seg)
            flags = (DESC_F_WRITE if writable else 0) | (DESC_F_NEXT if k + 1 < len(idxs) else 0)
            nxt = idxs[k + 1] if k + 1 < len(idxs) else 0
            self.set_desc(i, addr, n, flags, nxt)
            parts.append((addr, n, writable))
        self.bufs[idxs[0]] = parts
        self.publish(idxs[0])
        return idxs[0]

    def used_idx(self) -> int:
        return int(U16.unpack(self.mem.read(self.used + 2, 2))[0])

    def take_used(self) -> list[tuple[int, int, bytes]]:
        """New used entries as (head, written length, bytes written into the writable part)."""
        out = []
        while self.last_used != self.used_idx():
            slot = self.used + 4 + 8 * (self.last_used % self.num)
            head, n = USED_ELEM.unpack(self.mem.read(slot, 8))
            data = b"".join(self.mem.read(a, ln) for a, ln, w in self.bufs.get(head, []) if w)
            out.append((head, n, data[:n]))
            self.last_used = (self.last_used + 1) & 0xFFFF
            # recycle the descriptors
            i = head
            for _ in range(len(self.bufs.get(head, []))):
                self.free.append(i)
                d = DESC.unpack(self.mem.read(self.desc + 16 * i, 16))
                i = d[3]
        return out
