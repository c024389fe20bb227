"""Devices: CRI devices, all host devices for privileged containers (containerd's
WithDevices / WithHostDevices), and the device cgroup rules."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.errors import InvalidArgument

StatFn = Callable[[str], os.stat_result]

# directories of /dev that are mounts of their own in the container
_SKIP_DIRS = {"pts", "shm", "mqueue", "fd", "hugepages", ".lxc", "ptmx"}


def _device(path: str, dst: str, perms: str, st: os.stat_result) -> dict[str, Any] | None:
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
    else:
        return None
    return {
        "path": dst,
        "type": kind,
        "major": os.major(st.st_rdev),
        "minor": os.minor(st.st_rdev),
        "fileMode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "_access": perms or "rwm",
    }


def host_devices(root: str = "/dev", stat_fn: StatFn = os.lstat) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root:
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if p == os.path.join(root, "console"):
                continue  # crun provides the console
            try:
                d = _device(p, p, "rwm", stat_fn(p))
            except OSError:
                continue
            if d:
                out.append(d)
    return out


def devices(
    cri: list[api_pb2.Device], privileged: bool, stat_fn: StatFn = os.stat
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(linux.devices, linux.resources.devices)."""
    devs: list[dict[str, Any]] = []
    if privileged:
        devs = host_devices()
    for d in cri:
        try:
            st = stat_fn(d.host_path)
        except OSError as e:
            raise InvalidArgument(f"device {d.host_path}: {e}") from e
        dev = _device(d.host_path, d.container_path, d.permissions, st)
        if dev is None:
            raise InvalidArgument(f"{d.host_path} is not a device")
        devs = [x for x in devs if x["path"] != dev["path"]] + [dev]
    rules: list[dict[str, Any]] = [{"allow": privileged, "access": "rwm"}]
    for dev in devs:
        access = dev.pop("_access")
        if not privileged:
            rules.append(
                {"allow": True, "type": dev["type"], "major": dev["major"],
                 "minor": dev["minor"], "access": access}
            )  # fmt: skip
    return devs, rules
