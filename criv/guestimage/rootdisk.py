"""The guest root as a read-only erofs disk image, and the small initramfs that mounts it.

With the root in the initramfs every VM held the whole unpacked root (~70 MiB) in its own
RAM, and every clone copied it from its template. The image is a read-only virtio-pmem
device (``criv.hypervisor.domain.ReadOnlyPmem``) mounted with DAX: the guest maps its files
straight from the host's page cache, which holds the image once for all VMs, and caches none
of it in its own RAM (with ``vm.root_dax: false``, a read-only virtio disk whose pages each
VM reads into its own page cache). ``images/early-init`` (PID 1 of the small initramfs)
mounts the device the kernel command line names under a tmpfs overlay and hands PID 1 to the
root's ``/init``.

Only for criv's own kernel: it has erofs, overlayfs, virtio-pmem and DAX built in. The Debian
kernel fallback has them as modules and keeps its root in the initramfs.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import uuid
from pathlib import Path

from criv.errors import FailedPrecondition
from criv.guestimage import cpio

ROOT_DISK = "root.erofs"
EARLY_INITRD = "initramfs-early.cpio"
# the root image's size is a multiple of this: the guest kernel maps a virtio-pmem device's
# memory (for DAX) in 2 MiB subsections
PMEM_ALIGN = 2 << 20
# mount points the early init uses, made in the initramfs (it has no writable root else)
_EARLY_DIRS = ("bin", "dev", "proc", "lower", "rw", "newroot")


def make_erofs(root: Path, out_dir: Path, image_hash: str) -> Path:
    """``out_dir``/root.erofs from ``root``: uncompressed (a TCG guest would pay for
    decompression in every VM), owned by root, fixed timestamps and UUID (from the image's
    hash), no xattrs (the initramfs carried none either)."""
    mkfs = shutil.which("mkfs.erofs")
    if mkfs is None:
        raise FailedPrecondition("mkfs.erofs not found: apt-get install erofs-utils")
    out = out_dir / ROOT_DISK
    fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"criv-guest-root:{image_hash}"))
    # noinline_data: every file's data in whole blocks of its own, which DAX can map (an
    # inline tail would be read through the guest's page cache)
    cmd = [mkfs, "--quiet", "-T0", f"-U{fs_uuid}", "--all-root", "-x-1", "-Enoinline_data",
           str(out), str(root)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise FailedPrecondition(f"mkfs.erofs failed: {(r.stderr or r.stdout).strip()}")
    # a virtio-pmem device is this file, whole: the guest maps it in 2 MiB sections
    size = out.stat().st_size
    os.truncate(out, -(-size // PMEM_ALIGN) * PMEM_ALIGN)
    out.chmod(0o644)  # QEMU runs unprivileged and opens it read-only
    return out


def pack_early(busybox: Path, early_init: Path, out_dir: Path, mtime: int) -> Path:
    """``out_dir``/initramfs-early.cpio: the early init, a static busybox and /dev/console
    (the kernel opens it for init's stdio from the initramfs itself)."""
    tree = out_dir / "early"
    tree.mkdir()
    for d in _EARLY_DIRS:
        (tree / d).mkdir(mode=0o755)
    shutil.copyfile(busybox, tree / "bin/busybox")
    (tree / "bin/busybox").chmod(0o755)
    shutil.copyfile(early_init, tree / "init")
    (tree / "init").chmod(0o755)
    os.mknod(tree / "dev/console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
    out = out_dir / EARLY_INITRD
    with out.open("wb") as f:
        cpio.write_cpio(tree, f, mtime=mtime)
    shutil.rmtree(tree)
    out.chmod(0o644)
    return out
