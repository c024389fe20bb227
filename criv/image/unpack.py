"""Unpack one layer tar into a directory, safely, in overlayfs form.

Every write is relative to a directory fd opened with ``O_NOFOLLOW`` along a path the
tar entry names component by component, so no entry can land outside the layer root:
``..`` and absolute names are refused, and a symlink met on the way (one this layer
made, or a directory replaced by a symlink) fails the unpack instead of being followed.
Hardlink targets go through the same walk. Whiteouts become what overlayfs reads:
``.wh.NAME`` a 0/0 character device NAME, ``.wh..wh..opq`` the ``trusted.overlay.opaque``
xattr on its directory. Ownership, modes, mtimes, xattrs, hardlinks, symlinks and
device nodes are kept. The uncompressed stream is hashed and checked against the diff
id, and read through tarstream.py, which bounds it by ``image_limits``. This module
blocks: call it from a worker thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import gzip
import logging
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from criv.config import ImageLimitsConfig
from criv.errors import DigestMismatch, ImageError, UnsafeLayer
from criv.image.tarstream import CHUNK, LayerStream, members, open_decompressed

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_CACHED_FDS = 128
# An entry name longer than the kernel's PATH_MAX could not be used by path in the
# container either; the depth bound keeps the recursive tree code (shutil.rmtree of a
# layer) far from Python's recursion limit.
MAX_NAME_BYTES = 4096
MAX_DEPTH = 256
# Directory mtimes are set last (creating children changes them); past this many bytes
# of remembered paths a directory's mtime is set at once instead (it may then move).
_MAX_DIR_TIMES_BYTES = 64 << 20


@dataclass(frozen=True)
class UnpackResult:
    diff_id: str
    tar_bytes: int
    entries: int
    expanded_bytes: int  # tar_bytes plus the sizes of sparse files


def split_path(name: str, what: str = "entry") -> list[str]:
    """Components of a tar path; UnsafeLayer for absolute, ``..``, too long or deep."""
    if len(name.encode(errors="surrogateescape")) > MAX_NAME_BYTES:
        raise UnsafeLayer(f"layer {what} {name[:64]!r}...: longer than {MAX_NAME_BYTES} bytes")
    if name.startswith("/"):
        raise UnsafeLayer(f"layer {what} {name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"layer {what} {name!r}: path escapes the layer root ('..')")
    if len(parts) > MAX_DEPTH:
        raise UnsafeLayer(f"layer {what} {name[:64]!r}...: deeper than {MAX_DEPTH} components")
    return parts


class _Tree:
    """Directory fds under the layer root, reached without ever following a symlink."""

    def __init__(self, root: Path) -> None:
        self.root_fd = os.open(root, _DIR_FLAGS)
        self._cache: dict[tuple[str, ...], int] = {}

    def close(self) -> None:
        self.invalidate(())
        os.close(self.root_fd)

    def trim(self) -> None:
        """Bound the open fds; only between entries, never while one is borrowed."""
        if len(self._cache) >= _MAX_CACHED_FDS:
            self.invalidate(())

    def invalidate(self, prefix: tuple[str, ...]) -> None:
        n = len(prefix)
        for key in [k for k in self._cache if k[:n] == prefix]:
            os.close(self._cache.pop(key))

    def dir_fd(self, parts: tuple[str, ...], entry: str, create: bool = True) -> int:
        """An fd of the directory ``parts`` (borrowed: do not close), made if missing.

        Walks down from the parent if it is cached (tar lists a directory before its
        contents), else from the root; only ``parts`` itself is cached, so a deep
        entry holds two fds at a time, not one per level.
        """
        if not parts:
            return self.root_fd
        fd = self._cache.get(parts)
        if fd is not None:
            return fd
        start = len(parts) - 1
        cur = self._cache.get(parts[:-1]) if start else self.root_fd
        if cur is None:
            start, cur = 0, self.root_fd
        owned: int | None = None  # an fd this walk opened (closed as it moves on)
        try:
            for i in range(start, len(parts)):
                nxt = self._open_child(cur, parts[: i + 1], entry, create)
                if owned is not None:
                    os.close(owned)
                owned = cur = nxt
        except BaseException:
            if owned is not None:
                os.close(owned)
            raise
        self._cache[parts] = cur
        return cur

    @staticmethod
    def _open_child(parent: int, parts: tuple[str, ...], entry: str, create: bool) -> int:
        name = parts[-1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, 0o755, dir_fd=parent)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            where = "/".join(parts)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeLayer(
                    f"layer entry {entry!r}: goes through the symlink {where!r}"
                ) from None
            raise UnsafeLayer(f"layer entry {entry!r}: {where!r} is not a directory") from None
        return fd


def _syncfs(fd: int) -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if libc.syncfs(fd) == 0:
            return
    os.sync()


class _Unpacker:
    def __init__(self, root: Path, stream: LayerStream) -> None:
        self.tree = _Tree(root)
        self.stream = stream
        self.dir_times: dict[str, int] = {}  # "a/b" -> mtime, applied in finish()
        self.dir_times_bytes = 0
        self.entries = 0

    # -- helpers -------------------------------------------------------------------

    def _clear(self, parts: tuple[str, ...], pfd: int, name: str, keep_dir: bool) -> bool:
        """Remove what is at ``name`` (unless it is a dir and ``keep_dir``); True if kept."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self.tree.invalidate(parts)
            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)
        return False

    @staticmethod
    def _xattrs(m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for k, v in m.pax_headers.items():
            if not k.startswith("SCHILY.xattr."):
                continue
            key = k[len("SCHILY.xattr.") :]
            if key.startswith("trusted.overlay."):
                continue  # never let layer content steer overlayfs
            out.append((key, v.encode("utf-8", "surrogateescape")))
        return out

    @staticmethod
    def _set_xattr(target: int | str, key: str, value: bytes, name: str) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, key, value)
            else:
                os.setxattr(target, key, value, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EPERM, errno.EINVAL):
                log.debug("layer entry %r: xattr %s not kept: %s", name, key, e.strerror)
                return
            raise

    @staticmethod
    def _times(m: tarfile.TarInfo) -> tuple[int, int]:
        mtime = int(float(m.mtime) * 1e9)
        atime_s = m.pax_headers.get("atime")
        try:
            atime = int(float(atime_s) * 1e9) if atime_s else mtime
        except ValueError:
            atime = mtime
        return atime, mtime

    # -- entries -------------------------------------------------------------------

    def entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.entries += 1
        if m.isreg() and m.issparse():
            # its holes are written out as zeros: count the whole file, not the stream
            self.stream.add(m.size)
        self.tree.trim()
        parts = tuple(split_path(m.name))
        if not parts:
            if not m.isdir():
                raise UnsafeLayer(f"layer entry {m.name!r}: replaces the layer root")
            self._dir_meta((), self.tree.root_fd, m)
            return
        dir_parts, name = parts[:-1], parts[-1]
        if name == OPAQUE_MARKER:
            pfd = self.tree.dir_fd(dir_parts, m.name)
            os.setxattr(pfd, OPAQUE_XATTR, b"y")
            return
        if name.startswith(WHITEOUT_PREFIX):
            target = name[len(WHITEOUT_PREFIX) :]
            if target in ("", ".", "..") or target.startswith(WHITEOUT_PREFIX):
                raise UnsafeLayer(f"layer whiteout {m.name!r}: invalid target {target!r}")
            pfd = self.tree.dir_fd(dir_parts, m.name)
            self._clear((*dir_parts, target), pfd, target, keep_dir=False)
            os.mknod(target, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
            os.chown(target, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            return
        pfd = self.tree.dir_fd(dir_parts, m.name)
        if m.isdir():
            if not self._clear(parts, pfd, name, keep_dir=True):
                os.mkdir(name, 0o700, dir_fd=pfd)
            self._dir_meta(parts, self.tree.dir_fd(parts, m.name), m)
            return
        self._clear(parts, pfd, name, keep_dir=False)
        if m.isreg():
            self._file(tar, m, pfd, name)
        elif m.issym():
            os.symlink(m.linkname, name, dir_fd=pfd)
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(name, ns=self._times(m), dir_fd=pfd, follow_symlinks=False)
        elif m.islnk():
            tparts = split_path(m.linkname, "hardlink target")
            if not tparts:
                raise UnsafeLayer(f"layer hardlink {m.name!r}: links to the layer root")
            try:
                tfd = self.tree.dir_fd(tuple(tparts[:-1]), m.name, create=False)
                os.link(tparts[-1], name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                raise ImageError(
                    f"layer hardlink {m.name!r}: target {m.linkname!r} is not in the layer"
                ) from None
        elif m.ischr() or m.isblk() or m.isfifo():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            dev = os.makedev(m.devmajor, m.devminor) if not m.isfifo() else 0
            os.mknod(name, kind | 0o600, dev, dir_fd=pfd)
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            # A node we just made (never a symlink), in a directory we hold.
            os.chmod(name, m.mode & 0o7777, dir_fd=pfd)
            proc_path = f"/proc/self/fd/{pfd}/{name}"
            for key, value in self._xattrs(m):
                self._set_xattr(proc_path, key, value, m.name)
            os.utime(name, ns=self._times(m), dir_fd=pfd, follow_symlinks=False)
        else:
            log.warning("layer entry %r: unsupported tar type %r skipped", m.name, m.type)

    def _file(self, tar: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, name: str) -> None:
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            src = tar.extractfile(m)
            if src is not None:
                with open(fd, "wb", buffering=0, closefd=False) as out:
                    shutil.copyfileobj(src, out, CHUNK)
            os.fchown(fd, m.uid, m.gid)
            os.fchmod(fd, m.mode & 0o7777)
            for key, value in self._xattrs(m):
                self._set_xattr(fd, key, value, m.name)
            os.utime(fd, ns=self._times(m))
        finally:
            os.close(fd)

    def _dir_meta(self, parts: tuple[str, ...], fd: int, m: tarfile.TarInfo) -> None:
        os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode & 0o7777)
        for key, value in self._xattrs(m):
            self._set_xattr(fd, key, value, m.name)
        mtime = self._times(m)[1]
        path = "/".join(parts)
        if path not in self.dir_times and self.dir_times_bytes >= _MAX_DIR_TIMES_BYTES:
            os.utime(fd, ns=(mtime, mtime))  # memory stays bounded; only huge layers
            return
        self.dir_times_bytes += len(path) + 100
        self.dir_times[path] = mtime

    def finish(self) -> None:
        """Directory mtimes last (creating children changed them), deepest first."""
        self.tree.invalidate(())
        for path, mtime in sorted(self.dir_times.items(), key=lambda x: -x[0].count("/")):
            self.tree.trim()
            parts = tuple(path.split("/")) if path else ()
            try:
                fd = self.tree.dir_fd(parts, path, create=False)
            except (OSError, UnsafeLayer):
                continue  # replaced later in the layer
            os.utime(fd, ns=(mtime, mtime))
        _syncfs(self.tree.root_fd)


def unpack_layer(
    blob: Path,
    dest: Path,
    diff_id: str,
    what: str = "layer",
    limits: ImageLimitsConfig | None = None,
    charge: Callable[[int], None] | None = None,
) -> UnpackResult:
    """Unpack ``blob`` (gzip, zstd or plain tar) into the existing empty dir ``dest``.

    Raises UnsafeLayer for escaping entries, DigestMismatch when the uncompressed
    content is not ``diff_id``, ImageError for a corrupt archive, ImageLimitExceeded
    past ``limits`` (``charge`` is called with each expanded byte count: the image's
    budget). On error ``dest`` is left half-written: the caller unpacks into a
    temporary dir and removes it.
    """
    with open(blob, "rb") as raw:
        reader = LayerStream(open_decompressed(raw), limits or ImageLimitsConfig(), what, charge)
        unpacker = _Unpacker(dest, reader)
        try:
            for tar, m in members(reader):
                unpacker.entry(tar, m)
            reader.drain()
            unpacker.finish()
        except (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError, gzip.BadGzipFile) as e:
            raise ImageError(f"{what}: corrupt layer archive: {e}") from None
        finally:
            unpacker.tree.close()
    got = "sha256:" + reader.hash.hexdigest()
    if got != diff_id:
        raise DigestMismatch(f"{what}: uncompressed content is {got}, config says {diff_id}")
    return UnpackResult(got, reader.count, unpacker.entries, reader.expanded)
