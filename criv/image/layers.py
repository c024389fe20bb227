"""Unpacked layers: one directory per diff id, shared by every image that has the layer.

``<state_dir>/images/layers/<diff-hex>/fs`` holds the layer's own changes in overlayfs
form (whiteouts as 0/0 char devices, opaque dirs by xattr) - an image's root filesystem
is its layers' ``fs`` dirs stacked as overlay lowerdirs, as containerd's overlay
snapshotter does. Because a layer dir holds only its own diff, it depends on the diff id
alone, so keying by diff id shares it across images whatever their lower layers.
``meta.json`` beside ``fs`` records the diff id and its disk usage. A layer is unpacked
into ``layers/.tmp-*`` and renamed into place when complete, so a half-unpacked layer is
never seen; removal renames to ``trash/`` first, then deletes.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from criv.atomicfile import fsync_dir, rename_durable, write_atomic
from criv.config import ImageLimitsConfig
from criv.image.content import private_dir
from criv.image.media import digest_hex
from criv.image.unpack import unpack_layer

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class LayerInfo:
    diff_id: str
    fs: Path
    usage_bytes: int
    inodes: int
    expanded_bytes: int  # what it counts against image_limits (usage if unrecorded)


class LayerStore:
    def __init__(self, root: Path, limits: ImageLimitsConfig | None = None) -> None:
        self.dir = root / "layers"
        self.trash = root / "trash"
        self.limits = limits or ImageLimitsConfig()

    def setup(self) -> None:
        """Create the dirs; drop half-unpacked and trashed layers (blocking)."""
        private_dir(self.dir)
        for p in self.dir.iterdir():
            if p.name.startswith(".tmp-") or not (p / "meta.json").is_file():
                shutil.rmtree(p, ignore_errors=True)
            elif p.stat().st_mode & 0o777 != 0o700:
                os.chmod(p, 0o700)  # a layer dir from before the store was private
        if self.trash.exists():
            shutil.rmtree(self.trash, ignore_errors=True)
        private_dir(self.trash)

    def path(self, diff_id: str) -> Path:
        return self.dir / digest_hex(diff_id)

    def fs(self, diff_id: str) -> Path:
        return self.path(diff_id) / "fs"

    def get(self, diff_id: str) -> LayerInfo | None:
        """The layer if it is completely unpacked (blocking: reads meta.json)."""
        try:
            meta = json.loads((self.path(diff_id) / "meta.json").read_bytes())
        except (OSError, ValueError):
            return None
        usage = int(meta["usage_bytes"])
        expanded = int(meta.get("expanded_bytes", usage))  # layers unpacked before it was kept
        return LayerInfo(diff_id, self.fs(diff_id), usage, int(meta["inodes"]), expanded)

    def list(self) -> list[LayerInfo]:
        out = []
        for p in self.dir.iterdir():
            if len(p.name) == 64:
                info = self.get("sha256:" + p.name)
                if info is not None:
                    out.append(info)
        return out

    def unpack(
        self, diff_id: str, blob: Path, what: str, charge: Callable[[int], None] | None = None
    ) -> LayerInfo:
        """Unpack ``blob`` as layer ``diff_id`` unless present (blocking).

        Bounded by ``image_limits``; ``charge`` gets the expanded bytes as they are read
        (the image's budget). On any error nothing of the layer is left.
        """
        existing = self.get(diff_id)
        if existing is not None:
            return existing
        tmp = self.dir / f".tmp-{digest_hex(diff_id)[:16]}-{secrets.token_hex(6)}"
        tmp.mkdir(mode=0o700)
        try:
            fs = tmp / "fs"
            fs.mkdir(mode=0o755)
            res = unpack_layer(blob, fs, diff_id, what, self.limits, charge)
            usage, inodes = disk_usage(fs)
            usage, inodes = usage + 8192, inodes + 2  # the layer dir and meta.json
            meta = {
                "version": 1,
                "diff_id": diff_id,
                "usage_bytes": usage,
                "inodes": inodes,
                "expanded_bytes": res.expanded_bytes,
            }
            write_atomic(tmp / "meta.json", json.dumps(meta).encode())
            try:
                rename_durable(tmp, self.path(diff_id))
            except OSError as e:  # someone else completed it first: theirs is as good
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or self.get(diff_id) is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                fsync_dir(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        info = self.get(diff_id)
        assert info is not None
        return info

    def remove(self, diff_id: str) -> None:
        """Rename out of sight, then delete (blocking)."""
        src = self.path(diff_id)
        dst = self.trash / f"{src.name}-{secrets.token_hex(4)}"
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return
        shutil.rmtree(dst, ignore_errors=True)


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes, inodes) used under ``path``, du-style: st_blocks, hardlinks counted once.

    Walks by directory fd, not by path: a layer's names may make paths longer than
    PATH_MAX. One fd per level is open (a layer is at most unpack.MAX_DEPTH deep).
    """
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return 0, 0
    st = os.fstat(fd)
    seen = {(st.st_dev, st.st_ino)}
    total, inodes = st.st_blocks * 512, 1
    stack: list[tuple[int, Iterator[str]]] = [(fd, iter(os.listdir(fd)))]
    try:
        while stack:
            fd, names = stack[-1]
            name = next(names, None)
            if name is None:
                os.close(stack.pop()[0])
                continue
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_blocks * 512
            inodes += 1
            if stat.S_ISDIR(st.st_mode):
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                try:
                    listing = os.listdir(child)
                except BaseException:
                    os.close(child)
                    raise
                stack.append((child, iter(listing)))
    finally:
        for fd, _ in stack:
            os.close(fd)
    return total, inodes
