"""Guest memory as seen by the backend: regions shared by QEMU (memfd), mapped into this process.

Descriptor addresses are guest-physical; the vring addresses QEMU passes in SET_VRING_ADDR are
QEMU's own virtual addresses ("user addresses").  Both translate to a writable memoryview into
the mapped region.  A range must lie inside one region; anything else is an ``AddressError``.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable

from criv.vsock.protocol import MemRegion
from criv.vsock.record import Record


class AddressError(Exception):
    """A guest-supplied address range is outside every mapped region."""


class Region(Record):
    __slots__ = ("gpa", "mapping", "size", "uva", "view")

    def __init__(
        self, gpa: int, size: int, uva: int, view: memoryview, mapping: mmap.mmap | None = None
    ) -> None:
        self.gpa = gpa
        self.size = size
        self.uva = uva
        self.view = view
        self.mapping = mapping

    def close(self) -> None:
        try:
            self.view.release()
            if self.mapping is not None:
                self.mapping.close()
        except BufferError:
            pass  # slices still alive somewhere; the mapping goes when they do


class MemoryMap:
    def __init__(self, regions: Iterable[Region] = ()) -> None:
        self.regions: list[Region] = list(regions)

    @classmethod
    def from_fds(cls, regions: list[MemRegion], fds: list[int]) -> MemoryMap:
        """Map QEMU's regions; the fds are closed here (the mapping keeps the memory)."""
        if len(regions) != len(fds):
            raise ValueError(f"{len(regions)} regions but {len(fds)} fds")
        out: list[Region] = []
        try:
            for r, fd in zip(regions, fds, strict=True):
                m = mmap.mmap(fd, r.memory_size + r.mmap_offset, mmap.MAP_SHARED)
                view = memoryview(m)[r.mmap_offset : r.mmap_offset + r.memory_size]
                out.append(Region(r.guest_phys_addr, r.memory_size, r.userspace_addr, view, m))
        except BaseException:
            for reg in out:
                reg.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        return cls(out)

    @classmethod
    def from_buffers(cls, parts: Iterable[tuple[int, int, bytearray]]) -> MemoryMap:
        """Test helper: regions backed by bytearrays, given as (gpa, uva, buffer)."""
        return cls(Region(gpa, len(buf), uva, memoryview(buf)) for gpa, uva, buf in parts)

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions = []

    def gpa(self, addr: int, length: int) -> memoryview:
        """Writable view of guest-physical [addr, addr+length)."""
        for r in self.regions:
            off = addr - r.gpa
            if off >= 0 and off + length <= r.size:
                return r.view[off : off + length]
        raise AddressError(f"guest address {addr:#x}+{length:#x} is not mapped")

    def uva(self, addr: int, length: int) -> memoryview:
        """Writable view of QEMU virtual [addr, addr+length)."""
        for r in self.regions:
            off = addr - r.uva
            if off >= 0 and off + length <= r.size:
                return r.view[off : off + length]
        raise AddressError(f"QEMU address {addr:#x}+{length:#x} is not mapped")
