"""`criv vm-image commit`, the daemon's side: a stopped vm-image container's disk (its
overlay flattened over the shared base, :mod:`criv.vmimage.flatten`) stored as a
containerDisk image under a reference, by the same path as `criv vm-image import`
(:func:`~criv.vmimage.containerdisk.write_layout`, then
:func:`~criv.image.importer.import_layout`), so the result is an image like any pulled
one. The layout is written in the CLI's scratch dir (under the state dir), which the
CLI pushes from with ``--push`` and removes.

The container is held (its pod's and its own operation locks, in that order) while its
disk is read, so it is not removed or restarted under the flatten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from criv.errors import FailedPrecondition, InvalidArgument
from criv.image.importer import import_layout
from criv.sandbox.context import SandboxContext
from criv.sandbox.vmimage.isolation import VmImageIsolation
from criv.vmimage.containerdisk import SCRATCH_PREFIX, disk_file_name, layout_ref, write_layout
from criv.vmimage.flatten import FLATTEN_TIMEOUT, flatten

if TYPE_CHECKING:
    from criv.image.manager import ImageManager

log = logging.getLogger("criv.sandbox.vmimage")


@dataclass(frozen=True)
class Committed:
    image_id: str
    ref: str
    layout: Path
    disk_name: str  # under /disk/
    seconds: float  # flatten + store


def check_scratch(state_dir: Path, workdir: Path) -> None:
    """``workdir`` must be an empty directory made by the CLI directly under the state dir
    (``.vm-image-*``, not a link): the daemon writes only there."""
    if not workdir.is_absolute() or workdir.parent.resolve() != state_dir.resolve():
        raise InvalidArgument(f"scratch dir {str(workdir)!r} is not in {state_dir}")
    if not workdir.name.startswith(SCRATCH_PREFIX):
        raise InvalidArgument(f"scratch dir {str(workdir)!r} is not named {SCRATCH_PREFIX}*")
    try:
        st = os.lstat(workdir)
    except FileNotFoundError:
        raise InvalidArgument(f"scratch dir {str(workdir)!r} does not exist") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or any(workdir.iterdir()):
        raise InvalidArgument(f"scratch dir {str(workdir)!r} is not an empty directory of ours")


def disk_stem(base_name: str) -> str:
    """The committed disk's default name: its base's under /disk/ without the suffix, or
    ``disk`` where that is no name `criv vm-image` writes (the pulled image chose it)."""
    stem = Path(base_name).stem if base_name else ""
    if not stem:
        return "disk"
    try:
        disk_file_name(Path(stem + ".qcow2"))
    except InvalidArgument:
        return "disk"
    return stem


async def commit_container(
    ctx: SandboxContext,
    images: ImageManager,
    cid: str,
    ref: str,
    workdir: Path,
    name: str = "",
    timeout: float = FLATTEN_TIMEOUT,
) -> Committed:
    """Flatten container ``cid``'s disk into an image ``ref`` (see the module docstring)."""
    ref, tag = layout_ref(ref)
    check_scratch(Path(ctx.config.state_dir), workdir)
    c = ctx.container(cid)
    pod = ctx.pod(c.sandbox_id)
    iso = ctx.isolations.get(pod.isolation)
    if not isinstance(iso, VmImageIsolation):
        raise FailedPrecondition(
            f"container {c.id[:12]} is not a vm-image container (its pod runs in "
            f"{pod.isolation!r} isolation): only a VM disk can be committed"
        )
    t0 = time.monotonic()
    async with ctx.locks.hold(pod.id), ctx.locks.hold(c.id):
        box = iso.commit_source(pod, c.id)
        fname = disk_file_name(Path(disk_stem(box.base.name) + ".qcow2"), name)
        disk = workdir / fname
        await flatten(box.overlay, box.base.path, box.base.format, disk, timeout)
    try:
        layout = await asyncio.to_thread(
            write_layout, disk, workdir / "layout", tag, "",
            f"criv vm-image commit {c.id[:12]} (pod {pod.name})",
        )  # fmt: skip
    finally:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(disk.unlink)  # the layer blob holds it now
    image_id = await import_layout(images, layout.path, ref)
    took = time.monotonic() - t0
    log.info("committed container %s as %s (%s) in %.1f s", c.id[:12], ref, image_id, took)
    return Committed(image_id, ref, layout.path, layout.disk_name, took)
