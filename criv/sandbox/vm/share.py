"""A vm pod's shared directory: container rootfs and volumes bound into it for the
guest (9p), and undone when the container goes."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from criv.commands import run_command
from criv.errors import Internal, InvalidArgument
from criv.mounts import is_mounted
from criv.sandbox.isolation import PodPaths
from criv.sandbox.rootfs import unmount_all_under
from criv.sandbox.vm.layout import GUEST_SHARED


def container_share_dir(paths: PodPaths, cid: str) -> Path:
    return paths.shared / "c" / cid


async def share(paths: PodPaths, cid: str, host_path: Path, name: str) -> str:
    """Bind ``host_path`` under the pod's shared dir; the guest path it has there."""
    target = container_share_dir(paths, cid) / name

    def prepare() -> None:
        if not host_path.exists():
            raise InvalidArgument(f"mount source {host_path} does not exist")
        target.parent.mkdir(parents=True, exist_ok=True)
        if host_path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.touch(exist_ok=True)

    await asyncio.to_thread(prepare)
    if not await asyncio.to_thread(is_mounted, target):
        rc, out = await run_command("mount", "--bind", str(host_path), str(target))
        if rc != 0:
            raise Internal(f"cannot bind {host_path} into the pod's shared dir: {out}")
    return agent_path(paths, target)


async def unshare(paths: PodPaths, cid: str) -> None:
    """Undo :func:`share` for a container (before its own mounts go: a bind of the
    rootfs keeps the overlay busy)."""
    d = container_share_dir(paths, cid)
    if await asyncio.to_thread(d.exists):
        await unmount_all_under(d)
        await asyncio.to_thread(shutil.rmtree, d, True)


def agent_path(paths: PodPaths, host_path: Path) -> str:
    """The guest's path for a host path inside the pod's shared dir."""
    try:
        rel = host_path.relative_to(paths.shared)
    except ValueError:
        raise Internal(f"{host_path} is not in the pod's shared dir") from None
    return f"{GUEST_SHARED}/{rel}" if str(rel) != "." else GUEST_SHARED
