"""Image volumes (CRI ``Mount.image``, KEP 4639): an image's filesystem, read-only.

Like a rootfs, the volume is built on the host from the store's unpacked layers: one
layer is bound as it is, more are stacked in an overlay with lower dirs only (so the
kernel makes it read-only); both ``ro,nosuid,nodev``. It is mounted at
``<container dir>/imagevols/v<i>`` (host-only: under the pod's state dir, never in its
share), and ``image_sub_path`` is resolved inside it (:mod:`.subpath`). What the
container gets is then an ordinary read-only volume: ``host`` hands the path to the
agent, ``vm`` binds it into the pod's share as any volume.

Each volume's image is leased like the container's own (holder ``<cid>.v<i>``): a
RemoveImage leaves its layers until the container goes. Volumes are unmounted with the
container's rootfs (RemoveContainer, a failed create, pod teardown); recovery's mount
sweep takes those of containers it has no record of.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criv.commands import run_command
from criv.errors import FailedPrecondition, Internal
from criv.mounts import is_mounted, mounts_under
from criv.sandbox import subpath
from criv.sandbox.records import MountRecord
from criv.sandbox.rootfs import unmount_all_under

_MAX_OPTIONS = 4000  # the kernel takes mount options in one page
FLAGS = "ro,nosuid,nodev"


def holder(cid: str, index: int) -> str:
    """The lease holder of a container's ``index``-th mount (an image volume)."""
    return f"{cid}.v{index}"


def owner(lease_holder: str) -> str:
    """The container a lease holder belongs to (itself, or an image volume of it)."""
    return lease_holder.split(".", 1)[0]


def holders_of(holders: Iterable[str], cid: str) -> list[str]:
    """A container's lease holders among ``holders``: its rootfs's and its volumes'."""
    return [h for h in holders if owner(h) == cid]


def volumes_dir(container_dir: Path) -> Path:
    return container_dir / "imagevols"


@dataclass(frozen=True)
class ImageVolume:
    index: int
    mount: MountRecord  # with image_id / image_ref resolved
    layer_dirs: tuple[Path, ...]


async def acquire(images: Any, cid: str, mounts: Iterable[MountRecord]) -> list[ImageVolume]:
    """Lease the image of each image volume in ``mounts`` (ImageNotFound, naming it, for
    one not pulled). Leases taken before a failure stay for the caller to release."""
    out: list[ImageVolume] = []
    for i, m in enumerate(mounts):
        if not m.image:
            continue
        img = await images.acquire(m.image, holder(cid, i))
        ref = img.repo_digests[0] if img.repo_digests else img.id
        rec = dataclasses.replace(m, image_id=img.id, image_ref=ref, readonly=True)
        out.append(ImageVolume(i, rec, tuple(img.layer_dirs)))
    return out


def with_volumes(
    mounts: tuple[MountRecord, ...], vols: list[ImageVolume]
) -> tuple[MountRecord, ...]:
    """``mounts`` with each image volume's record replaced by its resolved one."""
    by_index = {v.index: v.mount for v in vols}
    return tuple(by_index.get(i, m) for i, m in enumerate(mounts))


def lower_options(layer_dirs: tuple[Path, ...]) -> str:
    for d in layer_dirs:
        if any(c in str(d) for c in ",:"):
            raise Internal(f"layer dir {d} has a character overlayfs cannot take")
    opts = f"{FLAGS},lowerdir=" + ":".join(str(d) for d in reversed(layer_dirs))
    if len(opts) > _MAX_OPTIONS:
        raise Internal(f"{len(layer_dirs)} layers: overlay options exceed a page")
    return opts


async def _mount(*args: str) -> None:
    rc, out = await run_command("mount", *args)
    if rc != 0:
        raise Internal(f"mount {' '.join(args)}: {out}")


async def mount(container_dir: Path, vol: ImageVolume) -> Path:
    """Mount the volume's image (if not yet) and return the host path the container
    gets: the image root, or its ``image_sub_path`` resolved inside it."""
    if not vol.layer_dirs:
        raise FailedPrecondition(f"image volume {vol.mount.image[:200]!r}: the image has no layers")
    target = volumes_dir(container_dir) / f"v{vol.index}"
    await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True, mode=0o755)
    if not await asyncio.to_thread(is_mounted, target):
        if len(vol.layer_dirs) == 1:
            await _mount("--bind", str(vol.layer_dirs[0]), str(target))
            await _mount("-o", f"remount,bind,{FLAGS}", str(target))
        else:
            opts = lower_options(vol.layer_dirs)
            await _mount("-t", "overlay", "overlay", "-o", opts, str(target))
    if not vol.mount.image_sub_path:
        return target
    return await asyncio.to_thread(subpath.resolve_on_disk, target, vol.mount.image_sub_path)


async def unmount(container_dir: Path) -> None:
    """Unmount and delete a container's image volumes (Internal if one stays)."""
    top = volumes_dir(container_dir)
    if not await asyncio.to_thread(top.is_dir):
        return
    await unmount_all_under(top)
    left = await asyncio.to_thread(mounts_under, top)
    if left:
        raise Internal(f"cannot unmount image volume {left[0]}")
    await asyncio.to_thread(shutil.rmtree, top, True)


async def any_mounted(container_dir: Path) -> bool:
    return bool(await asyncio.to_thread(mounts_under, volumes_dir(container_dir)))
