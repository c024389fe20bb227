"""containerDisk images (KubeVirt's convention): an OCI image whose layer holds one disk
file at ``/disk/<name>.qcow2`` (or ``.img``/``.raw``), owned 107:107, mode 0440.

- :func:`write_layout` wraps a local disk file as such an image in an OCI image layout
  directory (``oci-layout``, ``index.json``, ``blobs/sha256/``): what `criv vm-image
  import` hands to the daemon, and what ``skopeo copy oci:DIR:TAG docker://REF`` pushes;
- :func:`find_disk` finds the disk of a pulled image from its unpacked layers. The image is
  untrusted input: exactly one disk file, a regular file reached without following any
  symlink, inside the layer directories; anything else is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from criv.errors import InvalidArgument, NotFound
from criv.image.media import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST
from criv.image.reference import parse_reference

DISK_DIR = "disk"
DISK_SUFFIXES = (".qcow2", ".img", ".raw")
DISK_UID = DISK_GID = 107  # the qemu user of KubeVirt's images
DISK_MODE = 0o440
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPAQUE_XATTR = "trusted.overlay.opaque"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
# the scratch dirs `criv vm-image` makes directly under the state dir for a layout
SCRATCH_PREFIX = ".vm-image-"


@dataclass(frozen=True)
class Layout:
    """An OCI image layout holding one containerDisk image."""

    path: Path
    manifest_digest: str
    config_digest: str
    layer_digest: str
    disk_name: str  # the file name under /disk/


def layout_ref(ref: str) -> tuple[str, str]:
    """``ref`` normalized, and the tag its layout is written under (a digest is refused:
    the image's digest is computed)."""
    named = parse_reference(ref)
    if named.digest:
        raise InvalidArgument(f"{ref}: give a tag, not a digest (the digest is computed)")
    return str(named), named.tag or "latest"


def disk_file_name(disk: Path, name: str = "") -> str:
    """The name the disk gets under /disk/: ``name`` (default: the file's stem) plus a
    suffix (the file's own when it is one of DISK_SUFFIXES, else by its format)."""
    known = disk.suffix in DISK_SUFFIXES
    suffix = disk.suffix if known else (".qcow2" if _is_qcow2(disk) else ".img")
    base = name or (disk.stem if known else disk.name)
    if not _NAME.match(base):
        raise InvalidArgument(f"containerDisk: disk name {base!r} is not [A-Za-z0-9._-]")
    return base + suffix


def _is_qcow2(disk: Path) -> bool:
    with disk.open("rb") as f:
        return f.read(4) == b"QFI\xfb"


class _HashingWriter:
    """A file object that hashes and counts what goes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _put_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return "sha256:" + digest, len(data)


def write_layout(
    disk: Path, out: Path, tag: str = "latest", name: str = "", created_by: str = ""
) -> Layout:
    """Write a containerDisk image of ``disk`` as an OCI image layout at ``out`` (new dir).
    ``created_by`` goes in the config's history (default: `criv vm-image import`).

    The layer is an uncompressed tar (a qcow2 is compressed already) written once while
    it is hashed, so its digest is also its diff id. Blocking: call from a thread.
    """
    st = os.stat(disk)  # follows a symlink the operator gave on purpose
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"containerDisk: {disk} is not a regular file")
    fname = disk_file_name(disk, name)
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tmp = blobs / ".layer.partial"
    with tmp.open("wb") as raw:
        hw = _HashingWriter(raw)
        with tarfile.open(fileobj=hw, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            d = tarfile.TarInfo(DISK_DIR)
            d.type, d.mode, d.uid, d.gid, d.mtime = tarfile.DIRTYPE, 0o555, DISK_UID, DISK_GID, 0
            tar.addfile(d)
            info = tarfile.TarInfo(f"{DISK_DIR}/{fname}")
            info.size, info.mode, info.uid, info.gid = st.st_size, DISK_MODE, DISK_UID, DISK_GID
            info.mtime = 0
            with disk.open("rb") as src:
                tar.addfile(info, src)
        layer_digest, layer_size = "sha256:" + hw.h.hexdigest(), hw.size
    tmp.rename(blobs / layer_digest[7:])
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"dev.criv.containerdisk": f"/{DISK_DIR}/{fname}"}},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": created_by or f"criv vm-image import {disk.name}"}],
    }
    config_digest, config_size = _put_blob(blobs, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": layer_size}],
    }
    manifest_digest, manifest_size = _put_blob(blobs, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {REF_NAME_ANNOTATION: tag},
            }
        ],
    }
    (out / "index.json").write_text(json.dumps(index))
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return Layout(out, manifest_digest, config_digest, layer_digest, fname)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, _OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def find_disk(layer_dirs: Sequence[Path], what: str = "image") -> Path:
    """The disk file of a containerDisk image, given its unpacked layers (lowest first).

    The layers are overlayfs lower dirs (whiteouts as 0/0 char devices, opaque dirs by
    xattr), so the image's ``/disk`` is their merge: the topmost entry of each name wins.
    Refused (InvalidArgument): no ``/disk`` directory, ``/disk`` or the disk a symlink or
    not what it should be, no disk file, or more than one. Nothing is followed: every step
    is an ``openat``/``lstat`` with O_NOFOLLOW under a layer directory.
    """
    seen: dict[str, tuple[Path, os.stat_result]] = {}
    found_dir = False
    for layer in reversed(layer_dirs):
        try:
            lfd = os.open(layer, _DIR_FLAGS)
        except OSError as e:
            raise NotFound(f"{what}: layer {layer} unreadable: {e.strerror}") from None
        try:
            try:
                dst = os.stat(DISK_DIR, dir_fd=lfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if _is_whiteout(dst):
                break  # /disk deleted here: nothing below counts
            if not stat.S_ISDIR(dst.st_mode):
                raise InvalidArgument(
                    f"{what}: /{DISK_DIR} is not a directory (a containerDisk holds its disk "
                    f"under /{DISK_DIR}/; symlinks are not followed)"
                )
            found_dir = True
            dfd = os.open(DISK_DIR, _DIR_FLAGS, dir_fd=lfd)
            try:
                for entry in os.listdir(dfd):
                    if entry not in seen:
                        seen[entry] = (layer, os.stat(entry, dir_fd=dfd, follow_symlinks=False))
                if _opaque(dfd):
                    break
            finally:
                os.close(dfd)
        finally:
            os.close(lfd)
    if not found_dir:
        raise InvalidArgument(f"{what}: no /{DISK_DIR} directory: not a containerDisk image")
    disks = {
        n: v
        for n, v in seen.items()
        if n.endswith(DISK_SUFFIXES) and not n.startswith(".wh.") and not _is_whiteout(v[1])
    }
    if not disks:
        raise InvalidArgument(
            f"{what}: no disk under /{DISK_DIR}/ (want one *.qcow2, *.img or *.raw file)"
        )
    if len(disks) > 1:
        names = ", ".join(sorted(disks)[:5])
        raise InvalidArgument(f"{what}: more than one disk under /{DISK_DIR}/: {names}")
    (fname, (layer, st)), *_ = disks.items()
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise InvalidArgument(f"{what}: /{DISK_DIR}/{fname} is {kind}")
    return layer / DISK_DIR / fname


def disk_format(path: Path) -> str:
    """``qcow2`` or ``raw``, from the file's first bytes (not its name)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return "qcow2" if os.pread(fd, 4, 0) == b"QFI\xfb" else "raw"
    finally:
        os.close(fd)
