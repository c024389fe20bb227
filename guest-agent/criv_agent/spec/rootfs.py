"""Reading files of a container root filesystem without leaving it.

The rootfs comes from an image, so its symlinks are untrusted: ``/etc/passwd -> /etc/shadow``
of the host, or ``../../..`` chains, must resolve inside the rootfs (like
``filepath-securejoin``): absolute link targets are re-rooted, ``..`` stops at the root.
"""

from __future__ import annotations

import os
import stat

_MAX_LINKS = 40
_MAX_FILE = 4 << 20  # passwd/group beyond this are not plausible; bound the read


def resolve_in_root(root: str, path: str) -> str:
    """Host path of ``path`` interpreted with ``root`` as ``/``, symlinks scoped to root."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, name)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            # Missing components cannot be links; keep resolving the rest lexically.
            done.append(name)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise OSError(f"too many symlinks resolving {path!r}")
            target = os.readlink(candidate)
            new = [p for p in target.split("/") if p not in ("", ".")]
            if target.startswith("/"):
                done = []
            parts = new + parts
            continue
        done.append(name)
    return os.path.join(root, *done) if done else root


def read_rootfs_file(root: str, path: str) -> str | None:
    """Text of a regular file inside the rootfs, or None when absent or not a file."""
    host = resolve_in_root(root, path)
    try:
        fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == 40:  # ELOOP: a link appeared after resolution; refuse to follow it
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, _MAX_FILE)
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace")
