"""A vm pod's share: what the guest sees of the host (9p), built so the guest cannot
steer it.

The guest is hostile (docs/security.md): whatever it can write, it may have replaced by
a symlink to anywhere on the host. So no host operation resolves a path through a
directory the guest can write:

- criv builds every entry in a host-only tree (``PodPaths.share_tree``);
- the guest sees that tree through ``PodPaths.shared``, a read-only bind of it that is a
  mount-propagation slave, so binds criv adds to the tree later appear in the guest,
  each with its own flags, while the skeleton (``c/<cid>/<name>``) stays read-only to
  the guest: it cannot rename, replace or plant links in it;
- a bind gets its flags (``ro`` for a read-only volume; always ``nosuid,nodev``) in a
  host-only staging dir before it is bound into the tree, since flags set after a bind
  propagated would not reach the guest's copy;
- a volume is bound recursively (its sub-mounts reach the guest as virtio-fs
  submounts, as ``rbind`` shows them in containerd): ``nosuid,nodev`` go on every mount
  of it, ``ro`` on its top mount only, or on all of them for ``recursive_read_only``;
  with ``PROPAGATION_HOST_TO_CONTAINER`` the staged copy is a slave of the source, so
  the host's later mounts under it reach the guest too; otherwise it is private;
- teardown unmounts, then removes only what is on the share's own filesystem, never
  following links and never entering a mount (a volume's content is never deleted).

Only the 9p export (``shared``) is given to QEMU.

The skeleton's directories (the tree's top, ``c``, ``c/<cid>``) are searchable by
others (0711, no listing): in the guest, crun resolves a container's rootfs and volume
paths as the mapped root of its user namespace (``hostUsers: false``), which gets no DAC
override on them. On the host they sit under the pod's 0700 state dir, so no host user
reaches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path

from criv.commands import run_command
from criv.errors import Internal, InvalidArgument
from criv.mounts import is_mounted, mounts_under
from criv.sandbox.isolation import PodPaths
from criv.sandbox.mountattr import (
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
    set_flags,
)
from criv.sandbox.rootfs import umount_lazy, unmount_all_under
from criv.sandbox.vm.layout import GUEST_SHARED

BIND_FLAGS = "nosuid,nodev"


async def _mount(*args: str) -> None:
    rc, out = await run_command("mount", *args)
    if rc != 0:
        raise Internal(f"mount {' '.join(args)}: {out}")


async def prepare(paths: PodPaths) -> None:
    """Before QEMU starts: the host-only tree, and the guest's read-only view of it."""
    tree, shared = paths.share_tree, paths.shared

    def dirs() -> None:
        for d in (tree, paths.share_stage):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        shared.mkdir(exist_ok=True, mode=0o755)
        searchable(tree)

    await asyncio.to_thread(dirs)
    if not await asyncio.to_thread(is_mounted, tree):
        # its own peer group, so what is bound under it propagates to ``shared`` only
        await _mount("--bind", str(tree), str(tree))
        await _mount("--make-private", str(tree))
        await _mount("--make-shared", str(tree))
    if not await asyncio.to_thread(is_mounted, shared):
        await _mount("--bind", str(tree), str(shared))
        await _mount("--make-slave", str(shared))
        await _mount("-o", f"remount,bind,ro,{BIND_FLAGS}", str(shared))
    await _private_stage(paths)


async def _private_stage(paths: PodPaths) -> None:
    """The staging dir as a private mount: a bind staged there propagates nowhere (not
    into the mount namespaces of QEMU and virtiofsd, which are slaves of the host's),
    so unmounting it leaves no copy behind, whatever propagation it was given."""
    stage = paths.share_stage
    await asyncio.to_thread(stage.mkdir, parents=True, exist_ok=True, mode=0o700)
    if not await asyncio.to_thread(is_mounted, stage):
        await _mount("--bind", str(stage), str(stage))
        await _mount("--make-private", str(stage))


def container_dir(paths: PodPaths, cid: str) -> Path:
    return paths.share_tree / "c" / cid


def searchable(d: Path) -> None:
    """0711: others may traverse ``d`` (a skeleton dir), not list it."""
    d.chmod(0o711)


def _entry(parent: Path, name: str, is_dir: bool) -> Path:
    """Create ``parent/name`` (a dir or an empty file) in a host-only tree, refusing to
    use anything that is not what criv made (a link, a device...)."""
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = parent / name
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        if is_dir:
            target.mkdir(mode=0o755)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
        return target
    if (is_dir and not stat.S_ISDIR(st.st_mode)) or (not is_dir and not stat.S_ISREG(st.st_mode)):
        raise Internal(f"{target} is not what criv created; refusing to mount on it")
    return target


async def share(
    paths: PodPaths,
    cid: str,
    host_path: Path,
    name: str,
    readonly: bool,
    recursive_ro: bool = False,
    host_to_container: bool = False,
) -> str:
    """Bind ``host_path`` and its sub-mounts into the pod's share (read-only if asked);
    the guest's path."""
    if "/" in name or name in ("", ".", ".."):
        raise Internal(f"bad share entry name {name!r}")

    def prepare_entries() -> tuple[Path, Path]:
        if not host_path.exists():
            raise InvalidArgument(f"mount source {host_path} does not exist")
        is_dir = host_path.is_dir()
        stage = _entry(paths.share_stage / cid, name, is_dir)
        target = _entry(container_dir(paths, cid), name, is_dir)
        for d in (target.parent.parent, target.parent):  # c, c/<cid>
            searchable(d)
        return stage, target

    await _private_stage(paths)  # pods prepared before it was a mount have it now
    stage, target = await asyncio.to_thread(prepare_entries)
    if await asyncio.to_thread(is_mounted, target):
        return agent_path(paths, paths.shared / target.relative_to(paths.share_tree))
    try:
        await _mount("--rbind", str(host_path), str(stage))
        # before anything is unmounted in the copy: an unmount there would propagate to
        # the host's mounts while the copy is their peer
        await _mount("--make-rslave" if host_to_container else "--make-rprivate", str(stage))
        await _prune_pods(paths, host_path, stage)
        every = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if recursive_ro else 0)
        await asyncio.to_thread(set_flags, str(stage), every, True)
        if readonly:
            await asyncio.to_thread(set_flags, str(stage), MOUNT_ATTR_RDONLY, False)
        # the tree's copy (and the guest's, by propagation) clone the staged flags
        await _mount("--rbind", str(stage), str(target))
    finally:
        if await asyncio.to_thread(is_mounted, stage):
            await umount_lazy(stage)
    return agent_path(paths, paths.shared / target.relative_to(paths.share_tree))


async def _prune_pods(paths: PodPaths, host_path: Path, stage: Path) -> None:
    """A volume above criv's pod dirs (a hostPath of ``/``) leaves the pods' own mounts
    (shares, rootfs overlays, scratch) out of the copy: the guest has no business there,
    and copies of copies would multiply with every such pod."""
    pods = await asyncio.to_thread(os.path.realpath, paths.state.parent)
    src = await asyncio.to_thread(os.path.realpath, host_path)
    if pods != src and not pods.startswith(src.rstrip("/") + "/"):
        return
    inside = stage / os.path.relpath(pods, src) if pods != src else stage
    for m in await asyncio.to_thread(mounts_under, inside):
        await umount_lazy(m)
    if inside != stage and await asyncio.to_thread(is_mounted, inside):
        await umount_lazy(inside)


async def unshare(paths: PodPaths, cid: str) -> None:
    """Undo :func:`share` for a container (before its own mounts go: a bind of the
    rootfs keeps the overlay busy). Unmounting in the tree unmounts the guest's copy."""
    for d in (container_dir(paths, cid), paths.share_stage / cid):
        await unmount_all_under(d)
        await asyncio.to_thread(remove_same_fs, d)


async def teardown(paths: PodPaths) -> None:
    """The whole share, at pod teardown: the guest's view first, then the tree."""
    for top in (paths.shared, paths.share_tree, paths.share_stage):
        await unmount_all_under(top)
        if await asyncio.to_thread(is_mounted, top):
            await umount_lazy(top)
    for top in (paths.share_tree, paths.share_stage, paths.shared):
        await asyncio.to_thread(remove_same_fs, top)


def remove_same_fs(top: Path) -> None:
    """Delete ``top`` bottom-up without following links or entering a mount (a bind
    left behind keeps its directory and its content). Mounts are told apart by the
    mount id of each opened directory (``/proc/self/fdinfo``), which a bind of the same
    filesystem shares no more than any other mount."""
    try:
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        _remove_children(fd, _mnt_id(fd))
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(top)


def _mnt_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(f"no mnt_id for fd {fd}")


def _remove_children(dfd: int, mnt: int) -> None:
    for name in os.listdir(dfd):
        with contextlib.suppress(OSError):
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=dfd)
                continue
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            try:
                if _mnt_id(sub) != mnt:
                    continue  # a mount point: not ours to delete
                _remove_children(sub, mnt)
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=dfd)


def agent_path(paths: PodPaths, host_path: Path) -> str:
    """The guest's path for a host path inside the pod's shared dir."""
    try:
        rel = host_path.relative_to(paths.shared)
    except ValueError:
        raise Internal(f"{host_path} is not in the pod's shared dir") from None
    return f"{GUEST_SHARED}/{rel}" if str(rel) != "." else GUEST_SHARED
