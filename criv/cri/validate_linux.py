"""Request checks for the Linux parts of CRI configs (see :mod:`criv.cri.validate`):
cgroup values in the ranges the kernel takes, cpusets, sysctl and cgroup file names,
namespace modes, ids and security profiles."""

from __future__ import annotations

import itertools
import re

from criv.errors import InvalidArgument
from criv_agent.api.runtime.v1 import api_pb2

# Kubernetes' sysctl name rule (pkg/apis/core/validation): dot or slash separated words.
_SYSCTL_RE = re.compile(r"([a-z0-9]([-_a-z0-9]*[a-z0-9])?[./])*[a-z0-9]([-_a-z0-9]*[a-z0-9])?")
_CPUSET_RE = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")
_PAGE_SIZE_RE = re.compile(r"\d+[KMGTP]B")
# a cgroup v2 interface file of the container's own cgroup (never a path)
_CGROUP_FILE_RE = re.compile(r"[a-z][a-z0-9_]*\.[a-z0-9_.]+")
_CAPABILITY_RE = re.compile(r"[A-Za-z_]{1,64}")
# a systemd slice name, or a cgroup path: no control character (a newline would end the
# path in crun's and systemd's line-based files)
_SLICE_RE = re.compile(r"[^/\x00-\x1f\x7f]+\.slice")
_CGROUP_PATH_RE = re.compile(r"/[^\x00-\x1f\x7f]*")
# cgroup and CFS limits (kernel/sched: quota and period 1 ms .. 1 s, shares 2 .. 262144)
CPU_PERIOD_RANGE = (1000, 1_000_000)
CPU_QUOTA_RANGE = (1000, 2**44 - 1)
CPU_SHARES_RANGE = (2, 262_144)
# The smallest memory limit a container gets (Docker's): below it the container's own
# start (crun's init) is OOM-killed, and a running container's update is refused (EBUSY).
MEMORY_MIN = 6 * 1024 * 1024
ID_MAX = 2**32 - 2  # uid_t/gid_t; -1 is "unchanged" to the kernel
_MODES = frozenset(api_pb2.NamespaceMode.values())
_PROFILE_TYPES = frozenset(api_pb2.SecurityProfile.ProfileType.values())
_GROUP_POLICIES = frozenset(api_pb2.SupplementalGroupsPolicy.values())


def show(value: object, limit: int = 80) -> str:
    """A value for an error message: repr, clipped (a request may carry megabytes)."""
    r = repr(value)
    return r if len(r) <= limit else f"{r[:limit]}...({len(r)} chars)"


def fail(path: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{path}: {problem}")


def _in_range(value: int, lo: int, hi: int, path: str, unset: tuple[int, ...] = (0,)) -> None:
    if value not in unset and not lo <= value <= hi:
        allowed = ", ".join(str(u) for u in unset)
        raise fail(path, f"{value} is out of range ({allowed} or {lo}..{hi})")


def check_resources(
    r: api_pb2.LinuxContainerResources, path: str, memory_min: int = MEMORY_MIN
) -> None:
    _in_range(r.cpu_period, *CPU_PERIOD_RANGE, f"{path}.cpu_period")
    _in_range(r.cpu_quota, *CPU_QUOTA_RANGE, f"{path}.cpu_quota", unset=(0, -1))
    _in_range(r.cpu_shares, *CPU_SHARES_RANGE, f"{path}.cpu_shares")
    _in_range(r.oom_score_adj, -1000, 1000, f"{path}.oom_score_adj")
    if r.memory_limit_in_bytes and not memory_min <= r.memory_limit_in_bytes:
        raise fail(
            f"{path}.memory_limit_in_bytes",
            f"{r.memory_limit_in_bytes} is below the minimum {memory_min} (0: unset)",
        )
    swap, memory = r.memory_swap_limit_in_bytes, r.memory_limit_in_bytes
    # the kernel takes a memory+swap limit only at or above the memory limit
    if swap < -1 or 0 < swap < memory:
        raise fail(
            f"{path}.memory_swap_limit_in_bytes",
            f"{swap} is below the memory limit {memory} (0: unset, -1: unlimited)",
        )
    for name in ("cpuset_cpus", "cpuset_mems"):
        value = getattr(r, name)
        if value and not _CPUSET_RE.fullmatch(value):
            raise fail(f"{path}.{name}", f"{show(value)} is not a CPU/node list (0-3,5)")
    for i, h in enumerate(r.hugepage_limits):
        if not _PAGE_SIZE_RE.fullmatch(h.page_size):
            raise fail(f"{path}.hugepage_limits[{i}].page_size", f"{show(h.page_size)}")
    for key, value in r.unified.items():
        if not _CGROUP_FILE_RE.fullmatch(key):
            raise fail(f"{path}.unified", f"{show(key)} is not a cgroup interface file")
        if "\n" in value:
            raise fail(f"{path}.unified[{show(key)}]", "is more than one line")


def _check_namespaces(ns: api_pb2.NamespaceOption, path: str) -> None:
    for name in ("network", "pid", "ipc"):
        value = getattr(ns, name)
        if value not in _MODES:
            raise fail(f"{path}.{name}", f"unknown namespace mode {value}")
    if ns.pid == api_pb2.TARGET and not ns.target_id:
        raise fail(f"{path}.target_id", "is required with pid mode TARGET")
    if ns.HasField("userns_options"):
        _check_userns(ns.userns_options, f"{path}.userns_options")


# the kernel takes at most 340 lines in a uid_map/gid_map
MAX_ID_MAPPINGS = 340


def _check_mappings(ms: list[api_pb2.IDMapping], path: str) -> None:
    """Non-empty, each range non-empty and within 32-bit ids, no two overlapping on
    either side (the kernel refuses overlaps in a map)."""
    if not ms:
        raise fail(path, "a user namespace of mode POD needs at least one mapping")
    if len(ms) > MAX_ID_MAPPINGS:
        raise fail(path, f"{len(ms)} mappings (at most {MAX_ID_MAPPINGS})")
    for i, m in enumerate(ms):
        if m.length == 0:
            raise fail(f"{path}[{i}].length", "is 0")
        for side in ("container_id", "host_id"):
            if getattr(m, side) + m.length > 1 << 32:
                raise fail(f"{path}[{i}]", f"{side} {getattr(m, side)} + length {m.length} "
                           "is beyond the 32-bit id range")  # fmt: skip
    for side in ("container_id", "host_id"):
        spans = sorted((getattr(m, side), getattr(m, side) + m.length, i) for i, m in enumerate(ms))
        for (_, end, a), (start, _, b) in itertools.pairwise(spans):
            if start < end:
                raise fail(f"{path}[{b}]", f"{side} range overlaps mapping [{a}]")


def _check_userns(u: api_pb2.UserNamespace, path: str) -> None:
    if u.mode == api_pb2.NODE:
        return
    if u.mode != api_pb2.POD:
        name = api_pb2.NamespaceMode.Name(u.mode) if u.mode in _MODES else str(u.mode)
        raise fail(f"{path}.mode", f"{name} is not supported (POD or NODE)")
    _check_mappings(list(u.uids), f"{path}.uids")
    _check_mappings(list(u.gids), f"{path}.gids")


def _check_id(value: int, path: str) -> None:
    if not 0 <= value <= ID_MAX:
        raise fail(path, f"{value} is not a user or group id (0..{ID_MAX})")


def _check_profile(p: api_pb2.SecurityProfile, path: str, is_file: bool) -> None:
    if p.profile_type not in _PROFILE_TYPES:
        raise fail(f"{path}.profile_type", f"unknown profile type {p.profile_type}")
    if p.profile_type == api_pb2.SecurityProfile.Localhost:
        if not p.localhost_ref:
            raise fail(f"{path}.localhost_ref", "is required with a Localhost profile")
        if is_file and not p.localhost_ref.startswith("/"):
            raise fail(f"{path}.localhost_ref", f"{show(p.localhost_ref)} is not absolute")


def _check_ids(
    sc: api_pb2.LinuxSandboxSecurityContext | api_pb2.LinuxContainerSecurityContext, path: str
) -> None:
    if sc.HasField("run_as_user"):
        _check_id(sc.run_as_user.value, f"{path}.run_as_user")
    if sc.HasField("run_as_group"):
        _check_id(sc.run_as_group.value, f"{path}.run_as_group")
    for i, g in enumerate(sc.supplemental_groups):
        _check_id(g, f"{path}.supplemental_groups[{i}]")
    if sc.supplemental_groups_policy not in _GROUP_POLICIES:
        policy = sc.supplemental_groups_policy
        raise fail(f"{path}.supplemental_groups_policy", f"unknown policy {policy}")
    _check_namespaces(sc.namespace_options, f"{path}.namespace_options")
    _check_profile(sc.seccomp, f"{path}.seccomp", is_file=True)
    _check_profile(sc.apparmor, f"{path}.apparmor", is_file=False)


def check_security(sc: api_pb2.LinuxContainerSecurityContext, path: str) -> None:
    _check_ids(sc, path)
    for name in ("masked_paths", "readonly_paths"):
        for i, p in enumerate(getattr(sc, name)):
            if not p.startswith("/"):
                raise fail(f"{path}.{name}[{i}]", f"{show(p)} is not an absolute path")
    caps = sc.capabilities
    for name in ("add_capabilities", "drop_capabilities", "add_ambient_capabilities"):
        for i, c in enumerate(getattr(caps, name)):
            if not _CAPABILITY_RE.fullmatch(c):
                raise fail(f"{path}.capabilities.{name}[{i}]", f"{show(c)} is no capability")


def check_mount(m: api_pb2.Mount, path: str) -> None:
    """As containerd: ``recursive_read_only`` needs ``readonly`` and private propagation
    (a read-only tree cannot take mounts propagated into it later)."""
    if not m.recursive_read_only:
        return
    if not m.readonly:
        raise fail(f"{path}.recursive_read_only", "needs readonly: true")
    if m.propagation != api_pb2.MountPropagation.PROPAGATION_PRIVATE:
        name = api_pb2.MountPropagation.Name(m.propagation)
        raise fail(f"{path}.recursive_read_only", f"needs PROPAGATION_PRIVATE, not {name}")


def check_pod_linux(linux: api_pb2.LinuxPodSandboxConfig, path: str) -> None:
    parent = linux.cgroup_parent
    absolute = bool(_CGROUP_PATH_RE.fullmatch(parent)) and ".." not in parent.split("/")
    if parent and not (absolute or _SLICE_RE.fullmatch(parent)):
        raise fail(
            f"{path}.cgroup_parent",
            f"{show(parent)} is neither an absolute cgroup path nor a systemd slice",
        )
    for key, value in linux.sysctls.items():
        if not _SYSCTL_RE.fullmatch(key):
            raise fail(f"{path}.sysctls", f"{show(key)} is not a sysctl name")
        if "\n" in value:
            raise fail(f"{path}.sysctls[{show(key)}]", "is more than one line")
    _check_ids(linux.security_context, f"{path}.security_context")
    check_resources(linux.overhead, f"{path}.overhead", memory_min=0)  # an addition
    check_resources(linux.resources, f"{path}.resources")
