"""``mount_setattr(2)``: set a mount's flags, optionally on all mounts below it.

util-linux 2.38's ``mount -o remount,bind,...`` changes one mount and rewrites all of
its flags; ``mount_setattr`` sets only the flags named, and with ``AT_RECURSIVE`` on a
whole tree at once (what ``recursive_read_only`` needs). Linux 5.12+.
"""

from __future__ import annotations

import ctypes
import os
import platform

from criv.errors import Internal

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
_AT_RECURSIVE = 0x8000
_AT_SYMLINK_NOFOLLOW = 0x100
# the generic syscall table's number; the same on x86_64 and aarch64
_NR_MOUNT_SETATTR = 442


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def set_flags(path: str, flags: int, recursive: bool) -> None:
    """Add ``flags`` (MOUNT_ATTR_*) to the mount at ``path`` (and those below it)."""
    if platform.machine() not in ("x86_64", "aarch64"):
        raise Internal(f"mount_setattr: unknown syscall number on {platform.machine()}")
    attr = _MountAttr(attr_set=flags)
    at = _AT_SYMLINK_NOFOLLOW | (_AT_RECURSIVE if recursive else 0)
    rc = _libc.syscall(
        _NR_MOUNT_SETATTR,
        ctypes.c_int(-100),  # AT_FDCWD
        os.fsencode(path),
        ctypes.c_uint(at),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise Internal(f"mount_setattr {path}: {os.strerror(err)}")
