"""A fake guest driver for split virtqueues over a bytearray "guest memory", and a fake guest
(both rings and the device) built on it."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from criv.vsock import packet as P
from criv.vsock.device import RX, TX, VsockDevice
from criv.vsock.eventloop import Loop
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


CID = 3
GUEST_PORT = 1234


class Guest:
    """A guest driver's side of the whole device: rx/tx rings on fake memory, packets in and
    out, and the device's own event loop."""

    def __init__(self, tmp: Path, **device_args: int) -> None:
        self.mem = GuestMemory()
        self.rx = FakeDriver(self.mem, num=64)
        self.tx = FakeDriver(self.mem, num=64)
        self.loop = Loop()
        self.uds = str(tmp / "h.sock")
        args = {"buf_alloc": 64 * 1024, **device_args}
        self.dev = VsockDevice(self.loop, CID, self.uds, **args)
        self.fill_rx(16)
        self.dev.start_queue(RX, self.rx.device_queue())
        self.dev.start_queue(TX, self.tx.device_queue())
        self.fwd_cnt = 0

    def fill_rx(self, n: int) -> None:
        for _ in range(n):
            self.rx.add([P.HDR_SIZE, 4096])  # like Linux 6.1: header + 4 KiB buffer

    def send(
        self,
        op: int,
        *,
        port: int = 77,
        payload: bytes = b"",
        flags: int = 0,
        buf_alloc: int = 256 * 1024,
        src_cid: int = CID,
        length: int | None = None,
    ) -> None:
        hdr = P.Header(
            src_cid,
            P.HOST_CID,
            GUEST_PORT,
            port,
            len(payload) if length is None else length,
            P.TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            self.fwd_cnt,
        )
        self.tx.add([hdr.pack(), payload] if payload else [hdr.pack()])
        self.dev.kick(TX)
        self.tx.take_used()  # the device is done with it: recycle the descriptors

    def recv(self) -> list[tuple[P.Header, bytes]]:
        self.dev.kick(RX)
        out = []
        for _head, n, data in self.rx.take_used():
            hdr = P.Header.unpack(data)
            out.append((hdr, data[P.HDR_SIZE : n]))
            self.fwd_cnt += hdr.len if hdr.op == P.OP_RW else 0
        self.fill_rx(len(out))
        return out

    def spin(self, n: int = 5) -> None:
        for _ in range(n):
            self.loop.run_once(0.01)


def listen(g: Guest, port: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(f"{g.uds}_{port}")
    s.listen(4)
    s.settimeout(5)
    return s


def connect(g: Guest, buf_alloc: int = 256 * 1024, port: int = 77) -> socket.socket:
    """A guest connection to host port ``port``; returns the host end."""
    ls = listen(g, port)
    g.send(P.OP_REQUEST, buf_alloc=buf_alloc, port=port)
    ((hdr, _),) = g.recv()
    assert hdr.op == P.OP_RESPONSE and hdr.dst_port == GUEST_PORT and hdr.src_port == port
    c, _ = ls.accept()
    ls.close()
    c.settimeout(5)
    return c
