"""OCI mounts: containerd's default mounts, the pod's shared files, and CRI mounts.

Precedence as in containerd: a CRI mount replaces a default or pod-file mount with the
same destination; mounts are ordered so that parents come before children.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.spec.submounts import Submount, under

_PROPAGATION = {
    api_pb2.MountPropagation.PROPAGATION_PRIVATE: "rprivate",
    api_pb2.MountPropagation.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    api_pb2.MountPropagation.PROPAGATION_BIDIRECTIONAL: "rshared",
}


def default_mounts(privileged: bool) -> list[dict[str, Any]]:
    """containerd's populateDefaultUnixSpec mounts without /run (CRI drops it), plus the
    cgroup mount CRI adds; sysfs and cgroup are writable only for privileged."""
    ro = [] if privileged else ["ro"]
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", *ro]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", *ro]},
    ]  # fmt: skip


def bind(src: str, dst: str, readonly: bool, propagation: str = "rprivate") -> dict[str, Any]:
    return {
        "destination": dst,
        "type": "bind",
        "source": src,
        "options": ["rbind", propagation, "ro" if readonly else "rw"],
    }


@dataclass(frozen=True)
class PodFiles:
    """The pod's shared files as the agent sees them; None when the pod has none."""

    hostname: str | None
    hosts: str | None
    resolv_conf: str | None
    shm: str | None  # the pod /dev/shm (IPC POD) or the node's (IPC NODE)


def pod_file_mounts(files: PodFiles, readonly_rootfs: bool) -> list[dict[str, Any]]:
    out = []
    for src, dst in (
        (files.hostname, "/etc/hostname"),
        (files.hosts, "/etc/hosts"),
        (files.resolv_conf, "/etc/resolv.conf"),
    ):
        if src:
            out.append(bind(src, dst, readonly_rootfs))
    if files.shm:
        out.append(
            {
                "destination": "/dev/shm",
                "type": "bind",
                "source": files.shm,
                "options": ["rbind", "rprivate", "rw", "nosuid", "nodev", "noexec"],
            }
        )
    return out


def cri_mounts(
    mounts: list[api_pb2.Mount], agent_paths: list[str], table: list[Submount] | None = None
) -> list[dict[str, Any]]:
    """CRI mounts with the host-resolved sources, same order as given; each followed by
    one bind per mount below its source in ``table`` (see :mod:`.submounts`).

    ``recursive_read_only`` adds crun's ``rro`` (``mount_setattr`` with
    ``AT_RECURSIVE``); the validator took care that it comes with ``readonly`` and
    private propagation, as containerd requires.
    """
    out = []
    for m, src in zip(mounts, agent_paths, strict=True):
        prop = _PROPAGATION.get(m.propagation, "rprivate")
        opts = ["rbind", prop, "ro" if m.readonly else "rw"]
        if m.recursive_read_only:
            opts.append("rro")
        out.append({"destination": m.container_path, "type": "bind", "source": src,
                    "options": opts})  # fmt: skip
        for sub in under(src, table or []):
            rel = sub.path[len(os.path.realpath(src).rstrip("/")) :]
            ro = sub.readonly or m.recursive_read_only
            out.append({"destination": m.container_path.rstrip("/") + rel, "type": "bind",
                        "source": sub.path,
                        "options": ["rbind", prop, "ro" if ro else "rw"]})  # fmt: skip
    return out


def rootfs_propagation(mounts: list[api_pb2.Mount]) -> str | None:
    """As containerd: ``rshared`` if a mount is bidirectional, else ``rslave`` if one is
    host-to-container (crun would otherwise make the root private, cutting the volume
    off from the host's later mounts), else crun's default."""
    props = {m.propagation for m in mounts}
    if api_pb2.MountPropagation.PROPAGATION_BIDIRECTIONAL in props:
        return "rshared"
    if api_pb2.MountPropagation.PROPAGATION_HOST_TO_CONTAINER in props:
        return "rslave"
    return None


def _depth(dst: str) -> int:
    return len([p for p in os.path.normpath(dst).split("/") if p])


def merge_mounts(
    defaults: list[dict[str, Any]], pod: list[dict[str, Any]], cri: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Later groups override earlier ones by destination; stable sort by depth."""
    cri_dst = {os.path.normpath(m["destination"]) for m in cri}
    pod_dst = {os.path.normpath(m["destination"]) for m in pod}
    keep = [m for m in defaults if os.path.normpath(m["destination"]) not in cri_dst | pod_dst]
    keep += [m for m in pod if os.path.normpath(m["destination"]) not in cri_dst]
    # containerd sorts only the CRI mounts; defaults are all shallower or siblings
    keep += sorted(cri, key=lambda m: _depth(m["destination"]))
    return keep
