"""A domain's guest RAM as a file: out of a template, into a clone (sparse both ways).

Pod VMs back their RAM with a memfd (shared, for the vhost-user daemons). QEMU keeps that
memfd open, so root reaches it as ``/proc/<qemu pid>/fd/<n>``. Saving a template copies
only the RAM's non-zero pages into a sparse file; loading a clone writes them into the
clone's memfd before its device state is loaded (QEMU's ``x-ignore-shared`` leaves shared
RAM out of the migration stream). A clone thus allocates only the pages the template used:
a migration stream would carry every other page as a zero page, and QEMU reads each on
load, which allocates it in a memfd (shmem has no shared zero page).

Blocking: the driver runs these on its worker threads.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

CHUNK = 1 << 20
PAGE = 4096
_ZERO_PAGE = bytes(PAGE)


class GuestRamError(OSError):
    """The domain's guest RAM could not be found or copied."""


def ram_fd(pid: int, size: int) -> int:
    """An fd (O_RDWR) of QEMU ``pid``'s guest RAM memfd of ``size`` bytes."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError as e:
        raise GuestRamError(f"cannot list QEMU {pid}'s fds: {e}") from e
    for entry in entries:
        with contextlib.suppress(OSError):
            if not os.readlink(entry).startswith("/memfd:"):
                continue
            # a /proc fd link opens the very file QEMU holds; checked again once open
            # (QEMU may have swapped the fd): only a memfd QEMU itself has is written to
            fd = os.open(entry, os.O_RDWR | os.O_CLOEXEC)
            st = os.fstat(fd)
            mine = os.readlink(f"/proc/self/fd/{fd}")
            if stat.S_ISREG(st.st_mode) and st.st_size == size and mine.startswith("/memfd:"):
                return fd
            os.close(fd)
    raise GuestRamError(f"QEMU {pid} holds no guest RAM memfd of {size} bytes")


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the file's data (allocated) ranges, as SEEK_DATA/SEEK_HOLE say."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


def _copy(src: int, dst: int, size: int) -> int:
    """Copy ``src``'s non-zero pages to the same offsets of ``dst`` (runs of them in one
    write each); bytes written."""
    written = 0
    for start, end in _data_ranges(src, size):
        off = start
        while off < end:
            buf = os.pread(src, min(CHUNK, end - off), off)
            if not buf:
                break
            view = memoryview(buf)
            run = -1  # start of the current run of non-zero pages in buf
            for p in range(0, len(buf) + PAGE, PAGE):
                zero = p >= len(buf) or view[p : p + PAGE] == _ZERO_PAGE[: len(view[p : p + PAGE])]
                if not zero and run < 0:
                    run = p
                elif zero and run >= 0:
                    os.pwrite(dst, view[run:p], off + run)
                    written += min(p, len(buf)) - run
                    run = -1
            off += len(buf)
    return written


def save_ram(pid: int, size: int, dest: Path) -> int:
    """The guest RAM of QEMU ``pid`` into ``dest`` (sparse, 0600); bytes of data."""
    src = ram_fd(pid, size)
    try:
        dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(dst, size)
            return _copy(src, dst, size)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def load_ram(pid: int, size: int, source: Path) -> int:
    """``source`` (a :func:`save_ram` file) into the guest RAM of QEMU ``pid``, which must
    not run yet; bytes of data."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(src).st_size != size:
            raise GuestRamError(f"{source} is not a RAM image of {size} bytes")
        dst = ram_fd(pid, size)
        try:
            return _copy(src, dst, size)
        finally:
            os.close(dst)
    finally:
        os.close(src)
