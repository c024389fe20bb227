"""User namespaces (CRI ``userns_options`` mode POD) on the host side.

The agent gives the container a user namespace with the pod's mappings (OCI
``uidMappings``/``gidMappings``, crun writes them). What criv does here is make the
container's rootfs usable by the mapped ids, on the host, in ``host`` and ``vm``
isolation alike:

- an overlayfs mount cannot itself be idmapped (``mount_setattr`` refuses it; 6.18 too),
  but its lower layers can (5.19+). Each image layer gets an idmapped clone
  (``open_tree`` + ``mount_setattr(MOUNT_ATTR_IDMAP)`` with a user namespace holding the
  mappings), attached under the container dir just long enough to mount the overlay on
  them: overlayfs keeps private clones of its layers, so the attached ones are detached
  right after. A file the image owns as uid 0 shows as the mapped host uid, to the
  container as its root; the shared layers on disk stay as they are.
- the upper dir (the container's writable layer) is a plain directory owned by the host
  ids container root maps to: what the container writes lands on disk with its mapped
  host ids, as in a CRI-O or containerd pod with user namespaces.

Volumes are bind-mounted as they are (no idmap; ``Mount.uidMappings`` is not applied):
a file the container's root writes to a host directory belongs to the mapped host uid.

In ``vm`` isolation the guest kernel never idmaps anything: the overlay is built on the
host exactly as above and reaches the guest through the pod's virtio-fs share, so the
guest already sees the image's files owned by the mapped ids (virtiofsd reports the
host's); the agent gives the container the same user namespace in the guest, and
virtiofsd creates files with the guest caller's ids (the mapped ones). crun resolves
paths there as the mapped root too: the share's skeleton is searchable
(criv/sandbox/vm/share.py), while on the host the pod's state dir stays 0700 (crun does
not open the host path: :data:`ROOTFS_BY_HOST_PATH`). ``vm-image`` pods have no
container to give one (:func:`refuse_unless_supported`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from criv.errors import FailedPrecondition, Internal, InvalidArgument
from criv.sandbox.mountattr import attach_idmapped, detach

# isolation modes whose containers can get a user namespace
SUPPORTED_MODES = frozenset({"host", "vm"})
# modes whose crun opens the container's rootfs by its host path, as the mapped root
# (its parents on the host must be searchable); a vm guest reaches it through its share
ROOTFS_BY_HOST_PATH = frozenset({"host"})


@dataclass(frozen=True)
class IdMapping:
    container_id: int
    host_id: int
    length: int


@dataclass(frozen=True)
class UserNs:
    """A pod's user namespace mappings (CRI UserNamespace, mode POD)."""

    uids: tuple[IdMapping, ...]
    gids: tuple[IdMapping, ...]

    def host_root(self) -> tuple[int, int] | None:
        """The host uid and gid container root maps to (None: root is not mapped)."""
        uid, gid = _to_host(self.uids, 0), _to_host(self.gids, 0)
        return None if uid is None or gid is None else (uid, gid)


def _to_host(ms: tuple[IdMapping, ...], cid: int) -> int | None:
    for m in ms:
        if m.container_id <= cid < m.container_id + m.length:
            return m.host_id + cid - m.container_id
    return None


def refuse_unless_supported(mode: str, handler: str, userns: UserNs | None) -> None:
    if userns is not None and mode not in SUPPORTED_MODES:
        raise InvalidArgument(
            f"runtime handler {handler!r} runs pods in {mode} isolation, which does not "
            "support user namespaces (userns_options mode POD): its pod is a VM booted "
            "from a disk image, with no container to give one; use a handler mapped to "
            "host or vm isolation, or hostUsers: true"
        )


def _map_text(ms: tuple[IdMapping, ...]) -> str:
    return "".join(f"{m.container_id} {m.host_id} {m.length}\n" for m in ms)


def open_userns(userns: UserNs, timeout: float = 5.0) -> int:
    """An fd of a new user namespace with ``userns``'s mappings (blocking): a helper
    process unshares one, criv writes its maps (as root, any mapping goes) and keeps the
    namespace by fd; the helper is killed."""
    helper = subprocess.Popen(
        ["unshare", "--user", "--", "sleep", "60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        mine = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if os.readlink(f"/proc/{helper.pid}/ns/user") != mine:
                    break
            except OSError:
                pass
            if helper.poll() is not None or time.monotonic() > deadline:
                raise Internal("cannot create a user namespace (unshare --user failed)")
            time.sleep(0.005)
        try:
            with open(f"/proc/{helper.pid}/uid_map", "w", encoding="ascii") as f:
                f.write(_map_text(userns.uids))
            with open(f"/proc/{helper.pid}/gid_map", "w", encoding="ascii") as f:
                f.write(_map_text(userns.gids))
        except OSError as e:
            raise InvalidArgument(f"userns_options: the kernel refused the mappings: {e}") from e
        return os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        helper.kill()
        helper.wait()


def idmapped_layers(layer_dirs: list[Path], into: Path, userns: UserNs) -> list[Path]:
    """Attach an idmapped clone of each layer under ``into`` (blocking); the caller
    mounts the overlay on them, then calls :func:`detach_layers`."""
    into.mkdir(mode=0o700, parents=True, exist_ok=True)
    nsfd = open_userns(userns)
    out: list[Path] = []
    try:
        for i, d in enumerate(layer_dirs):
            dst = into / str(i)
            dst.mkdir(exist_ok=True)
            try:
                attach_idmapped(d, dst, nsfd)
            except OSError as e:
                raise FailedPrecondition(
                    f"user namespace: cannot idmap image layer {d} ({e.strerror}); "
                    "the image store's filesystem must support idmapped mounts (Linux 5.19+)"
                ) from e
            out.append(dst)
    except BaseException:
        detach_layers(into)
        raise
    finally:
        os.close(nsfd)
    return out


def detach_layers(into: Path) -> None:
    """Detach and remove what :func:`idmapped_layers` attached (blocking, idempotent)."""
    if not into.is_dir():
        return
    for d in into.iterdir():
        detach(d)
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        into.rmdir()


def own_upper(upper: Path, userns: UserNs) -> None:
    """The writable layer's top belongs to the host ids container root maps to."""
    root = userns.host_root()
    if root is not None:
        os.chown(upper, *root)


def searchable(dirs: list[Path]) -> None:
    """Let others search (not list) ``dirs`` (blocking): crun resolves the rootfs path
    inside the container's user namespace, as its mapped root, which gets no DAC
    override on host-owned directories (containerd makes its task dirs 0711 likewise).
    The state dir itself is 0711 already (criv/daemon.py); its parents must be too."""
    for d in dirs:
        mode = d.stat().st_mode & 0o7777
        if mode & 0o011 != 0o011:
            d.chmod(mode | 0o011)
