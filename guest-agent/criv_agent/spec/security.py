"""Capabilities, masked/read-only paths and seccomp, as containerd's CRI plugin sets them.

Seccomp ``RuntimeDefault`` is criv's own profile (``seccomp_default.json``): a *denylist*
(default action allow) of syscalls that containers do not need and that widen the kernel
attack surface (module loading, kexec, mount/namespace creation, keyrings, bpf, clock
setting, ...). Like Docker's profile, a denied syscall becomes allowed when the container
holds the capability that governs it. A denylist is weaker than containerd's allowlist
but does not break workloads that use new syscalls; the VM is criv's boundary.
"""

from __future__ import annotations

import json
from importlib import resources as _resources
from typing import Any

from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.errors import InvalidArgument

# Linux capability numbers 0..40 (include/uapi/linux/capability.h).
ALL_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
]  # fmt: skip

# containerd's defaultUnixCaps (pkg/oci/spec.go).
DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]  # fmt: skip

# containerd 1.7 defaults (pkg/oci/spec.go populateDefaultUnixSpec).
DEFAULT_MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
    "/sys/devices/virtual/powercap", "/proc/scsi",
]  # fmt: skip
DEFAULT_READONLY_PATHS = [
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
]  # fmt: skip


def known_caps(bounding: int) -> list[str]:
    return [c for i, c in enumerate(ALL_CAPS) if bounding >> i & 1]


def _cap_name(c: str) -> str:
    c = c.upper()
    return c if c.startswith("CAP_") else "CAP_" + c


def capabilities(sc: api_pb2.LinuxContainerSecurityContext, bounding: int) -> dict[str, list[str]]:
    """Bounding/effective/permitted (+ambient/inheritable) sets; order as containerd."""
    allc = known_caps(bounding)
    ambient: list[str] = []
    if sc.privileged:
        caps = list(allc)
    else:
        caps = list(DEFAULT_CAPS)
        c = sc.capabilities
        adds = [a.upper() for a in c.add_capabilities]
        drops = [d.upper() for d in c.drop_capabilities]
        # "ALL" first so that individual entries still refine it (containerd semantics)
        if "ALL" in adds:
            caps = list(allc)
        if "ALL" in drops:
            caps = []
        for a in adds:
            if a != "ALL" and _cap_name(a) not in caps:
                caps.append(_cap_name(a))
        dropped = {_cap_name(d) for d in drops if d != "ALL"}
        caps = [x for x in caps if x not in dropped]
        for a in c.add_ambient_capabilities:
            name = _cap_name(a)
            if name not in caps:
                caps.append(name)
            ambient.append(name)
    for name in caps:
        if name not in ALL_CAPS:
            raise InvalidArgument(f"unknown capability {name!r}")
    out = {"bounding": caps, "effective": list(caps), "permitted": list(caps)}
    if ambient:
        out["ambient"] = ambient
        out["inheritable"] = list(ambient)
    return out


def masked_paths(sc: api_pb2.LinuxContainerSecurityContext) -> tuple[list[str], list[str]]:
    """(maskedPaths, readonlyPaths): CRI's lists when given (kubelet sends them), else
    containerd's defaults; none for privileged containers."""
    if sc.privileged:
        return [], []
    masked = list(sc.masked_paths) or list(DEFAULT_MASKED_PATHS)
    ro = list(sc.readonly_paths) or list(DEFAULT_READONLY_PATHS)
    return masked, ro


# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
_CLONE_NS_FLAGS = [
    0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000,
]  # fmt: skip


def _default_profile() -> dict[str, Any]:
    text = (_resources.files("criv_agent.spec") / "seccomp_default.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


def runtime_default_seccomp(caps: list[str]) -> dict[str, Any]:
    """The shipped denylist, minus the rules lifted by capabilities the container holds."""
    prof = _default_profile()
    held = set(caps)
    rules: list[dict[str, Any]] = []
    for rule in prof["syscalls"]:
        lifted_by = rule.pop("unlessCaps", [])
        if held & set(lifted_by):
            continue
        rules.append(rule)
    if "CAP_SYS_ADMIN" not in held:
        # clone(2) creating namespaces: one rule per flag, since rules for the same
        # syscall are ORed and the conditions within one rule are ANDed.
        for flag in _CLONE_NS_FLAGS:
            arg = {"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}
            rules.append(
                {"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1, "args": [arg]}
            )
    prof["syscalls"] = rules
    prof.pop("comment", None)
    return prof


def _parse_profile_ref(sc: api_pb2.LinuxContainerSecurityContext) -> tuple[str, str]:
    """(kind, localhost path) from the typed field, else the deprecated string field."""
    if sc.HasField("seccomp"):
        t = sc.seccomp.profile_type
        if t == api_pb2.SecurityProfile.RuntimeDefault:
            return "runtime/default", ""
        if t == api_pb2.SecurityProfile.Unconfined:
            return "unconfined", ""
        return "localhost", sc.seccomp.localhost_ref
    path = sc.seccomp_profile_path
    if path in ("runtime/default", "docker/default"):
        return "runtime/default", ""
    if path.startswith("localhost/"):
        return "localhost", path[len("localhost/") :]
    if path in ("", "unconfined"):
        return "unconfined", ""
    raise InvalidArgument(f"unsupported seccomp profile {path!r}")


def seccomp(
    sc: api_pb2.LinuxContainerSecurityContext,
    caps: list[str],
    read_file: Any = None,
    profile: bytes = b"",
) -> dict[str, Any] | None:
    """The OCI ``linux.seccomp`` object, or None for unconfined (and privileged).

    A Localhost profile comes as ``profile``, read by criv on the host (its path is a
    host path, out of a vm guest's reach); only without it is ``localhost_ref`` read
    here (a criv that predates the field, host mode)."""
    if sc.privileged:
        return None
    kind, path = _parse_profile_ref(sc)
    if kind == "unconfined":
        return None
    if kind == "runtime/default":
        return runtime_default_seccomp(caps)
    if not path.startswith("/"):
        raise InvalidArgument(f"seccomp localhost profile path must be absolute: {path!r}")
    try:
        if profile:
            text: Any = profile
        elif read_file is not None:
            text = read_file(path)
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read(4 << 20)
        prof: dict[str, Any] = json.loads(text)
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot load seccomp profile {path}: {e}") from e
    if not isinstance(prof, dict) or "defaultAction" not in prof:
        raise InvalidArgument(f"seccomp profile {path} has no defaultAction")
    return _oci_profile(prof)


_OCI_KEYS = {"defaultAction", "defaultErrnoRet", "architectures", "flags", "listenerPath",
             "listenerMetadata", "syscalls"}  # fmt: skip
_OCI_SYSCALL_KEYS = {"names", "action", "errnoRet", "args"}


def _oci_profile(prof: dict[str, Any]) -> dict[str, Any]:
    """Docker/Kubernetes profiles (``archMap``, ``includes``/``excludes``, comments) in
    the OCI shape crun reads; OCI profiles pass through unchanged."""
    out = {k: v for k, v in prof.items() if k in _OCI_KEYS}
    if "architectures" not in out and isinstance(prof.get("archMap"), list):
        arches: list[str] = []
        for m in prof["archMap"]:
            arches += [m.get("architecture", ""), *m.get("subArchitectures", [])]
        out["architectures"] = [a for a in arches if a]
    syscalls = []
    for rule in prof.get("syscalls") or []:
        if rule.get("includes") or rule.get("excludes"):
            continue  # conditional on arch/caps/kernel in Docker's format: not applied
        r = {k: v for k, v in rule.items() if k in _OCI_SYSCALL_KEYS}
        if "names" not in r and "name" in rule:
            r["names"] = [rule["name"]]
        syscalls.append(r)
    if syscalls or "syscalls" in prof:
        out["syscalls"] = syscalls
    return out
