"""What criv reads of a qcow2 file itself, and the pinned backing chain it hands qemu-img.

A vm-image container's overlay is hostile input: the guest wrote its data, and its
header is writable by ``criv-qemu`` (QEMU's user, shared by every pod's VM). So criv
never lets ``qemu-img`` resolve a name read from it:

- :func:`read_header` reads the fixed header only (at most :data:`HEADER_READ` bytes, no
  backing file name, no extension walk) and :func:`check_header` refuses what could make
  QEMU open another file or decode data criv did not expect: an external data file,
  encryption, the corrupt bit, unknown incompatible features;
- :func:`pinned_chain` is the ``json:`` filename of the overlay with its backing given
  explicitly (the known base, whose own backing is ``null``), so the backing file name
  and format in the overlay's header are never looked at.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from criv.errors import FailedPrecondition

MAGIC = b"QFI\xfb"
HEADER_READ = 104  # v3's fixed header (v2's is 72)
# incompatible feature bits (docs/interop/qcow2.txt)
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
_ALLOWED_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
_V2 = struct.Struct(">4sIQIIQI")  # magic, version, backing offset/size, cluster bits, size, crypt


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    has_backing: bool
    cluster_bits: int
    size: int  # virtual size, bytes
    crypt_method: int
    incompatible: int


def parse_header(data: bytes, what: str) -> Qcow2Header:
    """The header at the start of ``data``; FAILED_PRECONDITION naming ``what`` if it is
    not a qcow2 v2/v3 header."""
    if len(data) < _V2.size or data[:4] != MAGIC:
        raise FailedPrecondition(f"{what} is not a qcow2 image")
    _, version, backing_off, backing_size, cluster_bits, size, crypt = _V2.unpack_from(data)
    incompatible = 0
    if version == 3:
        if len(data) < 80:
            raise FailedPrecondition(f"{what}: truncated qcow2 v3 header")
        (incompatible,) = struct.unpack_from(">Q", data, 72)
    elif version != 2:
        raise FailedPrecondition(f"{what}: qcow2 version {version} is not 2 or 3")
    return Qcow2Header(
        version, bool(backing_off and backing_size), cluster_bits, size, crypt, incompatible
    )


def check_header(h: Qcow2Header, what: str) -> None:
    """Refuse what would make QEMU open another file or read data criv cannot vouch for."""
    if h.incompatible & INCOMPAT_DATA_FILE:
        raise FailedPrecondition(f"{what} names an external data file; refused")
    if h.incompatible & INCOMPAT_CORRUPT:
        raise FailedPrecondition(f"{what} is marked corrupt")
    if h.incompatible & ~_ALLOWED_INCOMPAT:
        raise FailedPrecondition(
            f"{what} has unknown incompatible features {h.incompatible & ~_ALLOWED_INCOMPAT:#x}"
        )
    if h.crypt_method:
        raise FailedPrecondition(f"{what} is encrypted")
    if not 9 <= h.cluster_bits <= 21:
        raise FailedPrecondition(f"{what}: cluster bits {h.cluster_bits} out of range")


def read_header(path: Path, what: str) -> Qcow2Header:
    """:func:`parse_header` of the file's first bytes (no link followed; blocking)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return parse_header(os.pread(fd, HEADER_READ, 0), what)
    finally:
        os.close(fd)


def virtual_size(path: Path, fmt: str, what: str) -> int:
    """A base disk's virtual size: a checked qcow2 header's, or a raw file's length."""
    if fmt == "raw":
        return os.lstat(path).st_size
    h = read_header(path, what)
    check_header(h, what)
    return h.size


def _file(path: Path) -> dict[str, object]:
    return {"driver": "file", "filename": str(path)}


def _pinned_node(path: Path, fmt: str) -> dict[str, object]:
    if fmt not in ("qcow2", "raw"):
        raise ValueError(f"disk format {fmt!r}")
    node: dict[str, object] = {"driver": fmt, "file": _file(path)}
    if fmt == "qcow2":
        node["backing"] = None
    return node


def pinned_image(path: Path, fmt: str) -> str:
    """The ``json:`` filename of ``path`` as ``fmt`` with no backing: a qcow2's backing
    name, whatever it says, is never looked at."""
    return "json:" + json.dumps(_pinned_node(path, fmt), separators=(",", ":"))


def pinned_chain(overlay: Path, base: Path, base_format: str) -> str:
    """The ``json:`` filename of ``overlay`` (qcow2) backed by ``base`` and nothing else:
    both paths and both formats given, the base's own backing (if a qcow2) ``null``."""
    node = {"driver": "qcow2", "file": _file(overlay), "backing": _pinned_node(base, base_format)}
    return "json:" + json.dumps(node, separators=(",", ":"))


def convert_argv(overlay: Path, base: Path, base_format: str, out: Path) -> list[str]:
    """``qemu-img convert`` of the pinned chain into one compressed qcow2 with no backing."""
    return [
        "qemu-img", "convert", "-q", "-c", "-O", "qcow2",
        pinned_chain(overlay, base, base_format), str(out),
    ]  # fmt: skip
