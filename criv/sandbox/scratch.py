"""The per-pod bound on container writable layers: a scratch filesystem per pod.

A container's overlay ``upper``/``work`` dirs take whatever its processes write (vm
pods: guest root). So that a pod cannot fill the host's state filesystem, they live in
a filesystem of the pod's own: ``<pod>/scratch.img``, a sparse file of the pod's limit,
ext4 without a journal, loop-mounted at ``<pod>/scratch`` (``mount -o loop`` sets the
loop device to autoclear, so unmounting frees it). When it is full, writes in the
containers fail with ENOSPC and the host is untouched.

It is made at the pod's first CreateContainer (under the pod lock), not at
RunPodSandbox, so pod start does not pay for it; each container gets ``scratch/<cid>``.
A pod keeps the size it was made with. Teardown is the pod's: RemovePodSandbox
unmounts everything under the pod dir (lazily if busy) and deletes the dir with the
image; recovery keeps a known pod's scratch mount and unmounts an unknown pod's.

CRI gives the runtime no ephemeral-storage figure on Linux (only
``WindowsContainerResources.rootfs_size_in_bytes``), so the limit is the configured
``runtime.pod_scratch_limit_mib``; 0 turns this off (layers under the container dir).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from criv.commands import run_command
from criv.errors import Internal
from criv.mounts import is_mounted

log = logging.getLogger("criv.sandbox.scratch")

IMAGE = "scratch.img"
MOUNT = "scratch"


def mkfs_argv(image: Path) -> list[str]:
    """ext4 for a throwaway filesystem: no journal (its content does not outlive the
    pod's VM or a host reboot), no reserved blocks, root-owned root. mke2fs discards a
    fresh file (punches holes), so it marks the inode tables zeroed and the kernel has
    no lazy init to write: the image stays sparse."""
    return [
        "mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
        "-E", "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0", str(image),
    ]  # fmt: skip


def mount_argv(image: Path, target: Path) -> list[str]:
    # nosuid,nodev: what a guest puts in its upper dir is never a setuid file or a
    # device on the host (the container sees its files through the overlay's own flags)
    return ["mount", "-t", "ext4", "-o", "loop,nosuid,nodev", str(image), str(target)]


class PodScratch(Protocol):
    """Where a container's writable layer lives (a unit test fakes it)."""

    async def prepare(self, pod_dir: Path, cid: str) -> Path | None:
        """The container's dir in the pod's scratch filesystem, made (and the
        filesystem first, at the pod's first container: call under the pod lock);
        None when per-pod limits are off (the layer goes under the container dir)."""
        ...

    async def locate(self, pod_dir: Path, cid: str) -> Path | None:
        """The container's dir in the pod's scratch filesystem, if it has one."""
        ...


class LoopScratch:
    def __init__(self, limit_mib: int) -> None:
        self.limit_mib = limit_mib

    async def prepare(self, pod_dir: Path, cid: str) -> Path | None:
        if self.limit_mib <= 0:
            return None
        mnt = pod_dir / MOUNT
        if not await asyncio.to_thread(is_mounted, mnt):
            t0 = time.monotonic()
            await make(pod_dir, self.limit_mib)
            log.info(
                "pod %s: %d MiB scratch filesystem made in %.0f ms",
                pod_dir.name[:12], self.limit_mib, (time.monotonic() - t0) * 1000,
            )  # fmt: skip
        d = mnt / cid
        await asyncio.to_thread(_mkdir, d)
        return d

    async def locate(self, pod_dir: Path, cid: str) -> Path | None:
        d = pod_dir / MOUNT / cid
        return d if await asyncio.to_thread(d.is_dir) else None


async def make(pod_dir: Path, limit_mib: int) -> None:
    """Create, format and mount ``<pod_dir>/scratch.img`` at ``<pod_dir>/scratch``. An
    image left unmounted (criv stopped half-way) is replaced: no container uses it."""
    image, mnt = pod_dir / IMAGE, pod_dir / MOUNT
    await asyncio.to_thread(_sparse_file, image, limit_mib << 20)
    try:
        await asyncio.to_thread(_mkdir, mnt)
        rc, out = await run_command(*mkfs_argv(image))
        if rc != 0:
            raise Internal(f"cannot make the pod's scratch filesystem: {out}")
        rc, out = await run_command(*mount_argv(image, mnt))
        if rc != 0:
            raise Internal(
                f"cannot mount the pod's scratch filesystem (loop devices needed; "
                f"runtime.pod_scratch_limit_mib: 0 turns the per-pod limit off): {out}"
            )
    except BaseException:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(image.unlink)
        raise
    await asyncio.to_thread(os.chmod, mnt, 0o700)


def _sparse_file(path: Path, size: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _mkdir(d: Path) -> None:
    d.mkdir(mode=0o700, exist_ok=True)
