"""A deterministic newc cpio writer for the guest initramfs.

Written here rather than with GNU cpio so the archive is byte-for-byte reproducible: entries
sorted by path, every mtime fixed, owner root, inode numbers assigned in order, no device
numbers from the build host. Hard links are stored as separate copies (the kernel's unpacker
needs no link bookkeeping then, and the rootfs has few).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TRAILER = "TRAILER!!!"


def _header(
    ino: int,
    mode: int,
    nlink: int,
    mtime: int,
    size: int,
    rdevmajor: int,
    rdevminor: int,
    name: bytes,
) -> bytes:
    fields = [ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdevmajor, rdevminor, len(name) + 1, 0]
    return b"070701" + b"".join(b"%08X" % v for v in fields) + name + b"\0"


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def walk_sorted(root: Path) -> Iterator[Path]:
    """Every path under ``root`` (not root itself), parents before children, sorted by name."""
    names = sorted(os.listdir(root))
    for name in names:
        p = root / name
        yield p
        if p.is_dir() and not p.is_symlink():
            yield from walk_sorted(p)


def write_cpio(root: Path, out: BinaryIO, mtime: int = 0) -> int:
    """Archive the tree under ``root`` into ``out``; return the number of entries."""
    ino = 0
    pos = 0

    def emit(data: bytes) -> None:
        nonlocal pos
        out.write(data)
        pos += len(data)

    for p in walk_sorted(root):
        st = p.lstat()
        rel = p.relative_to(root).as_posix().encode()
        ino += 1
        mode = st.st_mode
        perm = stat.S_IMODE(mode)
        if stat.S_ISREG(mode):
            size = st.st_size
            emit(_header(ino, stat.S_IFREG | perm, 1, mtime, size, 0, 0, rel))
            emit(_pad(110 + len(rel) + 1))
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    emit(chunk)
            emit(_pad(size))
        elif stat.S_ISLNK(mode):
            target = os.readlink(p).encode()
            emit(_header(ino, stat.S_IFLNK | 0o777, 1, mtime, len(target), 0, 0, rel))
            emit(_pad(110 + len(rel) + 1))
            emit(target)
            emit(_pad(len(target)))
        elif stat.S_ISDIR(mode):
            emit(_header(ino, stat.S_IFDIR | perm, 2, mtime, 0, 0, 0, rel))
            emit(_pad(110 + len(rel) + 1))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = stat.S_IFCHR if stat.S_ISCHR(mode) else stat.S_IFBLK
            emit(
                _header(
                    ino, kind | perm, 1, mtime, 0, os.major(st.st_rdev), os.minor(st.st_rdev), rel
                )
            )
            emit(_pad(110 + len(rel) + 1))
        # sockets and fifos are skipped: a fresh guest has no use for the build host's
    name = TRAILER.encode()
    emit(_header(0, 0, 1, 0, 0, 0, 0, name))
    emit(_pad(110 + len(name) + 1))
    # the kernel reads whole 512-byte blocks when the archive is concatenated
    emit(b"\0" * ((512 - pos % 512) % 512))
    return ino
