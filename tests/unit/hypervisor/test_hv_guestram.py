"""Guest RAM out of a template and into a clone: only non-zero pages travel, holes and
zero pages stay unallocated, and only QEMU's memfd of the right size is taken."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from criv.hypervisor import guestram

SIZE = 8 << 20
PAGE = 4096


def _allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


@pytest.mark.timeout(10)
def test_ram_goes_out_and_back_as_its_non_zero_pages_only(tmp_path: Path) -> None:
    ram = os.memfd_create("memory-backend-memfd")
    try:
        os.ftruncate(ram, SIZE)
        os.pwrite(ram, b"a" * 5000, 3 * PAGE + 7)  # pages 3-4
        os.pwrite(ram, bytes(16 * PAGE), 1 << 20)  # allocated, but zero
        os.pwrite(ram, b"z", SIZE - 1)  # the last page
        out = tmp_path / "ram.bin"
        assert guestram.save_ram(os.getpid(), SIZE, out) == 3 * PAGE
        assert out.stat().st_size == SIZE and out.stat().st_mode & 0o777 == 0o600
        assert out.stat().st_blocks * 512 <= 4 * PAGE  # sparse

        clone = os.memfd_create("memory-backend-memfd")
        try:
            os.ftruncate(clone, SIZE)
            os.close(ram)
            ram = -1  # only the clone's memfd of SIZE is open now
            assert guestram.load_ram(os.getpid(), SIZE, out) == 3 * PAGE
            assert os.pread(clone, 5000, 3 * PAGE + 7) == b"a" * 5000
            assert os.pread(clone, 1, SIZE - 1) == b"z"
            assert _allocated(clone) == 3 * PAGE  # nothing else touched
        finally:
            os.close(clone)
    finally:
        if ram >= 0:
            os.close(ram)


@pytest.mark.timeout(10)
def test_only_a_memfd_of_the_ram_size_is_taken(tmp_path: Path) -> None:
    other = os.memfd_create("something-else")
    os.ftruncate(other, SIZE // 2)
    plain = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    os.ftruncate(plain, SIZE)  # right size, not a memfd
    try:
        with pytest.raises(guestram.GuestRamError, match="no guest RAM memfd"):
            guestram.ram_fd(os.getpid(), SIZE)
        bad = tmp_path / "short.bin"
        bad.write_bytes(b"x")
        with pytest.raises(guestram.GuestRamError, match="not a RAM image"):
            guestram.load_ram(os.getpid(), SIZE, bad)
    finally:
        os.close(other)
        os.close(plain)
