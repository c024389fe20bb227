"""Pod network namespaces: persistent, named files under criv's run dir.

A pod's netns is a bind mount of a fresh network namespace onto
``<run_dir>/netns/criv-<id12>`` (what ``unshare --net=FILE`` does), not an entry in
the machine-wide ``/run/netns``: several criv instances (tests, a bench beside
containerd) then never see, or garbage-collect, each other's namespaces, and the
orphan sweep at start-up only looks at files this instance owns. ``ip netns`` tools
still work through ``nsenter --net=PATH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from criv.commands import run_command
from criv.errors import Internal
from criv.mounts import is_mounted

log = logging.getLogger("criv.network")

NETNS_PREFIX = "criv-"


def netns_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "netns"


def netns_path(run_dir: str | Path, sandbox_id: str) -> Path:
    return netns_dir(run_dir) / f"{NETNS_PREFIX}{sandbox_id[:12]}"


async def create_netns(path: Path) -> None:
    """Create a new network namespace pinned at ``path`` with its loopback up."""
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    if await asyncio.to_thread(is_mounted, path):
        return  # already there (a retried RunPodSandbox)
    await asyncio.to_thread(path.touch, 0o644)
    rc, out = await run_command("unshare", f"--net={path}", "true")
    if rc != 0:
        await asyncio.to_thread(_unlink, path)
        raise Internal(f"cannot create network namespace {path}: {out}")
    # CNI's loopback plugin only acts on its own ifname; lo must be up for localhost
    # traffic between the pod's containers whatever the conflist holds.
    rc, out = await run_command("nsenter", f"--net={path}", "ip", "link", "set", "lo", "up")
    if rc != 0:
        await delete_netns(path)
        raise Internal(f"cannot bring up lo in {path}: {out}")


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def delete_netns(path: Path) -> None:
    """Unpin and remove ``path``; a missing namespace is success."""
    if await asyncio.to_thread(is_mounted, path):
        # MNT_DETACH: a process still inside keeps the namespace alive, but the
        # file goes now; the namespace dies with its last process.
        rc, out = await run_command("umount", "--lazy", str(path))
        if rc != 0 and await asyncio.to_thread(is_mounted, path):
            raise Internal(f"cannot unmount network namespace {path}: {out}")
    await asyncio.to_thread(_unlink, path)


def list_netns(run_dir: str | Path) -> list[Path]:
    d = netns_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith(NETNS_PREFIX))


def netns_exists(path: Path) -> bool:
    return os.path.exists(path) and is_mounted(path)
