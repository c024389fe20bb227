"""The kernel's mount API where ``mount(8)`` falls short (Linux 5.12+).

- :func:`set_flags`: ``mount_setattr(2)`` sets only the flags named, and with
  ``AT_RECURSIVE`` on a whole tree at once (what ``recursive_read_only`` needs);
  util-linux 2.38's ``mount -o remount,bind,...`` changes one mount and rewrites all of
  its flags.
- :func:`attach_idmapped`: ``open_tree`` + ``mount_setattr(MOUNT_ATTR_IDMAP)`` +
  ``move_mount``: an idmapped clone of a mount (user namespaces, criv/sandbox/userns.py).
- :func:`detach`: a lazy unmount.
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

from criv.errors import Internal

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_AT_RECURSIVE = 0x8000
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_EMPTY_PATH, _AT_FDCWD = 0x1000, -100
_OPEN_TREE_CLONE, _O_CLOEXEC = 1, 0o2000000
_MOVE_MOUNT_F_EMPTY_PATH = 4
_MNT_DETACH = 2
# the generic syscall table's numbers; the same on x86_64 and aarch64
_NR_OPEN_TREE, _NR_MOVE_MOUNT, _NR_MOUNT_SETATTR = 428, 429, 442


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def _check_arch(what: str) -> None:
    if platform.machine() not in ("x86_64", "aarch64"):
        raise Internal(f"{what}: unknown syscall numbers on {platform.machine()}")


def set_flags(path: str, flags: int, recursive: bool) -> None:
    """Add ``flags`` (MOUNT_ATTR_*) to the mount at ``path`` (and those below it)."""
    _check_arch("mount_setattr")
    attr = _MountAttr(attr_set=flags)
    at = _AT_SYMLINK_NOFOLLOW | (_AT_RECURSIVE if recursive else 0)
    rc = _libc.syscall(
        _NR_MOUNT_SETATTR,
        ctypes.c_int(_AT_FDCWD),
        os.fsencode(path),
        ctypes.c_uint(at),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise Internal(f"mount_setattr {path}: {os.strerror(err)}")


def _syscall_error(what: str, path: Path) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what} {path}: {os.strerror(err)}")


def attach_idmapped(src: Path, dst: Path, userns_fd: int) -> None:
    """An idmapped clone of the mount tree at ``src``, attached at ``dst`` (blocking)."""
    _check_arch("idmapped mounts")
    fd = _libc.syscall(
        _NR_OPEN_TREE, ctypes.c_int(_AT_FDCWD), os.fsencode(src),
        ctypes.c_uint(_OPEN_TREE_CLONE | _O_CLOEXEC),
    )  # fmt: skip
    if fd < 0:
        raise _syscall_error("open_tree", src)
    try:
        attr = _MountAttr(attr_set=_MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
        rc = _libc.syscall(
            _NR_MOUNT_SETATTR, ctypes.c_int(fd), b"", ctypes.c_uint(_AT_EMPTY_PATH),
            ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
        )  # fmt: skip
        if rc != 0:
            raise _syscall_error("mount_setattr(MOUNT_ATTR_IDMAP)", src)
        rc = _libc.syscall(
            _NR_MOVE_MOUNT, ctypes.c_int(fd), b"", ctypes.c_int(_AT_FDCWD), os.fsencode(dst),
            ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
        )  # fmt: skip
        if rc != 0:
            raise _syscall_error("move_mount", dst)
    finally:
        os.close(fd)


def detach(path: Path) -> None:
    """Lazily unmount ``path`` (blocking); a path with no mount is left as it is."""
    if _libc.umount2(os.fsencode(path), ctypes.c_int(_MNT_DETACH)) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT
            raise OSError(err, f"umount {path}: {os.strerror(err)}")
