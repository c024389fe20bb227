"""OCI runtime spec from CRI, as containerd 1.6/1.7's CRI plugin builds it.

``build_spec`` is pure apart from reading the container rootfs's /etc/passwd and
/etc/group, a Localhost seccomp profile (when criv sent none) and device nodes: given
the same inputs it returns the same dict, which crun gets as ``config.json``. Modules:
process (args/env/user), users, mounts (+ submounts), security (caps, masked paths,
seccomp), namespaces, resources, devices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.errors import InvalidArgument
from criv_agent.spec import devices as _devices
from criv_agent.spec import mounts as _mounts
from criv_agent.spec import security as _security
from criv_agent.spec.namespaces import PodNamespaces, namespaces
from criv_agent.spec.process import build_process
from criv_agent.spec.resources import resources
from criv_agent.spec.submounts import parse_mountinfo
from criv_agent.spec.userns import user_namespace
from criv_agent.spec.users import UserDb

__all__ = ["HostInfo", "PodNamespaces", "SpecInput", "build_spec", "image_config"]


@dataclass(frozen=True)
class HostInfo:
    """What the spec depends on about the machine the agent runs on."""

    cgroup_v2: bool = True
    swap_accounting: bool = False
    # the agent's bounding set: "all capabilities" for privileged containers, as
    # containerd takes the current process's (a cap it lacks would fail capset)
    cap_bounding: int = (1 << 41) - 1


@dataclass
class SpecInput:
    container_id: str
    config: api_pb2.ContainerConfig
    sandbox_config: api_pb2.PodSandboxConfig
    image: dict[str, Any]
    rootfs: str
    mount_sources: list[str]
    cgroups_path: str
    pod_files: _mounts.PodFiles = field(
        default_factory=lambda: _mounts.PodFiles(None, None, None, None)
    )
    pod_ns: PodNamespaces = field(default_factory=PodNamespaces)
    target_pid_ns: str | None = None
    host: HostInfo = field(default_factory=HostInfo)
    users: UserDb | None = None  # tests pass one; else read from rootfs
    # the agent's mount table (/proc/self/mountinfo): the CRI mounts' sub-mounts
    mountinfo: str = ""
    # a Localhost seccomp profile as criv read it on the host (b"": read localhost_ref)
    seccomp_profile: bytes = b""


def image_config(raw: bytes) -> dict[str, Any]:
    """The image's ``config`` object, from either the whole OCI image config or just it."""
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InvalidArgument(f"image config is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise InvalidArgument("image config is not a JSON object")
    inner = data.get("config")
    if isinstance(inner, dict):
        return inner
    return data


def stop_signal(image: dict[str, Any]) -> int:
    """The image's StopSignal as a number (SIGTERM when absent or unknown)."""
    import signal

    s = str(image.get("StopSignal") or "").upper()
    if s.isdigit():
        return int(s)
    if s and not s.startswith("SIG"):
        s = "SIG" + s
    try:
        return int(signal.Signals[s]) if s else int(signal.SIGTERM)
    except KeyError:
        return int(signal.SIGTERM)


def build_spec(inp: SpecInput) -> dict[str, Any]:
    cfg = inp.config
    sc = cfg.linux.security_context
    if len(inp.mount_sources) != len(cfg.mounts):
        raise InvalidArgument("resolved mounts do not match the CRI mounts")
    if sc.privileged and not inp.sandbox_config.linux.security_context.privileged:
        raise InvalidArgument("no privileged container allowed in a non-privileged sandbox")
    users = inp.users or UserDb.from_rootfs(inp.rootfs)
    hostname = inp.sandbox_config.hostname
    process = build_process(cfg, inp.image, users, hostname)
    caps = _security.capabilities(sc, inp.host.cap_bounding)
    process["capabilities"] = caps

    ns = namespaces(
        sc.namespace_options, inp.pod_ns, inp.target_pid_ns, inp.host.cgroup_v2, sc.privileged
    )
    masked, ro_paths = _security.masked_paths(sc)
    devs, dev_rules = _devices.devices(list(cfg.devices), sc.privileged)
    res = resources(cfg.linux.resources, inp.host.swap_accounting)
    res["devices"] = dev_rules

    linux: dict[str, Any] = {
        "namespaces": ns,
        "cgroupsPath": inp.cgroups_path,
        "resources": res,
        "maskedPaths": masked,
        "readonlyPaths": ro_paths,
        # the default persona, named so that crun sets it: it clears the fixed layout
        # the agent's helpers may run with (fixedlayout.py), so the container has ASLR
        "personality": {"domain": "LINUX"},
    }
    if devs:
        linux["devices"] = devs
    userns = user_namespace(sc.namespace_options)
    if userns is not None:
        ns.append({"type": "user"})
        linux.update(userns)
    sysctls = dict(inp.sandbox_config.linux.sysctls)
    if sysctls and userns is None:  # in a user namespace: the agent's (podsysctl.py)
        linux["sysctl"] = sysctls
    seccomp = _security.seccomp(sc, caps["bounding"], profile=inp.seccomp_profile)
    if seccomp is not None:
        linux["seccomp"] = seccomp

    mounts = _mounts.merge_mounts(
        _mounts.default_mounts(sc.privileged),
        _mounts.pod_file_mounts(inp.pod_files, sc.readonly_rootfs),
        _mounts.cri_mounts(list(cfg.mounts), inp.mount_sources, parse_mountinfo(inp.mountinfo)),
    )
    propagation = _mounts.rootfs_propagation(list(cfg.mounts))
    if propagation:
        linux["rootfsPropagation"] = propagation
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": inp.rootfs, "readonly": bool(sc.readonly_rootfs)},
        "mounts": mounts,
        "annotations": {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": cfg.metadata.name,
        },
        "linux": linux,
    }
    if any(n["type"] == "uts" and "path" not in n for n in ns):
        spec["hostname"] = hostname
    return spec
