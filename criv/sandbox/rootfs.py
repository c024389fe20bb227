"""Container root filesystems: an overlay of the image's unpacked layers.

The image store unpacks each layer once (lowest first in ``layer_dirs``); a container
gets ``upper``/``work`` dirs of its own in its ``writable_dir`` (the pod's scratch
filesystem, :mod:`.scratch`, or beside its ``rootfs`` mount point when that is off), so
containers of one image share the layers and write only to their own upper dir.
overlayfs wants ``lowerdir`` topmost first, hence the reversal.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Protocol

from criv.commands import run_command
from criv.errors import Internal, InvalidArgument
from criv.mounts import is_mounted, mounts_under
from criv.sandbox import userns as _userns
from criv.sandbox.userns import UserNs

log = logging.getLogger("criv.sandbox.rootfs")

# The kernel takes mount options in one page.
_MAX_OPTIONS = 4000


def overlay_options(layer_dirs: list[Path], upper: Path, work: Path) -> str:
    if not layer_dirs:
        raise InvalidArgument("image has no layers to mount")
    for d in layer_dirs:
        if any(c in str(d) for c in ",:"):
            raise Internal(f"layer dir {d} has a character overlayfs cannot take")
    lower = ":".join(str(d) for d in reversed(layer_dirs))
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if len(opts) > _MAX_OPTIONS:
        raise Internal(f"{len(layer_dirs)} layers: overlay options exceed a page")
    return opts


async def mount_rootfs(
    layer_dirs: list[Path],
    container_dir: Path,
    writable_dir: Path,
    userns: UserNs | None = None,
    searchable: bool = True,
) -> Path:
    """``userns``: the layers are idmapped to its mappings, the upper dir owned by its
    root (see :mod:`criv.sandbox.userns`); with ``searchable``, the rootfs path's
    parents up to the pod's state dir become searchable by others (crun opens that path
    as the mapped root; a vm pod's crun does not, its state dir stays 0700)."""
    rootfs = container_dir / "rootfs"
    upper, work = writable_dir / "upper", writable_dir / "work"
    overlay_options(layer_dirs, upper, work)  # checks before anything is mounted

    def prepare() -> None:
        for d in (rootfs, upper, work):
            d.mkdir(parents=True, exist_ok=True)
        if userns is not None:
            _userns.own_upper(upper, userns)
        if userns is not None and searchable:
            # the rootfs path: <pod>/containers/<cid>/rootfs (crun resolves it as the
            # container's mapped root); the sandboxes dir is searchable already
            _userns.searchable([container_dir.parent.parent, container_dir.parent, container_dir])

    await asyncio.to_thread(prepare)
    if await asyncio.to_thread(is_mounted, rootfs):
        return rootfs
    idmapped = container_dir / "idmap"
    lower = layer_dirs
    if userns is not None:
        lower = await asyncio.to_thread(_userns.idmapped_layers, layer_dirs, idmapped, userns)
    try:
        opts = overlay_options(lower, upper, work)
        rc, out = await run_command("mount", "-t", "overlay", "overlay", "-o", opts, str(rootfs))
    finally:
        if userns is not None:  # overlayfs holds clones of its layers
            await asyncio.to_thread(_userns.detach_layers, idmapped)
    if rc != 0:
        raise Internal(f"cannot mount container rootfs at {rootfs}: {out}")
    return rootfs


async def unmount_rootfs(container_dir: Path, writable_dir: Path) -> None:
    """Unmount (lazily, if busy) and delete the container's rootfs, upper and work (and
    ``writable_dir`` itself when it is not the container dir)."""
    rootfs = container_dir / "rootfs"
    # idmapped layer clones a crash left attached (normally detached at mount time):
    # off before anything below is deleted, or rmtree would reach into an image layer
    await asyncio.to_thread(_userns.detach_layers, container_dir / "idmap")
    for _ in range(8):  # stacked mounts, if any, come off one by one
        if not await asyncio.to_thread(is_mounted, rootfs):
            break
        rc, out = await run_command("umount", str(rootfs))
        if rc != 0:
            rc, out = await run_command("umount", "--lazy", str(rootfs))
            if rc != 0:
                raise Internal(f"cannot unmount {rootfs}: {out}")
    # upper holds what the container wrote: rmtree works from dir fds, never following
    # a link, and no mount is ever made inside it
    for d in (container_dir / "rootfs", writable_dir / "upper", writable_dir / "work"):
        await asyncio.to_thread(shutil.rmtree, d, True)
    if writable_dir != container_dir:
        await asyncio.to_thread(shutil.rmtree, writable_dir, True)


async def umount_lazy(path: Path) -> None:
    rc, out = await run_command("umount", "--lazy", str(path))
    if rc != 0 and await asyncio.to_thread(is_mounted, path):
        raise Internal(f"cannot unmount {path}: {out}")


async def unmount_all_under(prefix: Path) -> None:
    """Before deleting a directory tree: never let rmtree walk into a mount."""
    for m in await asyncio.to_thread(mounts_under, prefix):
        await umount_lazy(m)


class RootfsMounter(Protocol):
    """How the container service gets a container's rootfs (a unit test fakes it)."""

    async def mount(
        self,
        layer_dirs: list[Path],
        container_dir: Path,
        writable_dir: Path,
        userns: UserNs | None = None,
        searchable: bool = True,
    ) -> Path: ...

    async def unmount(self, container_dir: Path, writable_dir: Path) -> None: ...

    async def is_mounted(self, container_dir: Path) -> bool: ...


class OverlayRootfs:
    async def mount(
        self,
        layer_dirs: list[Path],
        container_dir: Path,
        writable_dir: Path,
        userns: UserNs | None = None,
        searchable: bool = True,
    ) -> Path:
        return await mount_rootfs(layer_dirs, container_dir, writable_dir, userns, searchable)

    async def unmount(self, container_dir: Path, writable_dir: Path) -> None:
        await unmount_rootfs(container_dir, writable_dir)

    async def is_mounted(self, container_dir: Path) -> bool:
        return await asyncio.to_thread(is_mounted, container_dir / "rootfs")
