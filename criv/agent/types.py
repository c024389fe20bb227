"""What the agent tells criv, as plain dataclasses.

sandbox/ works with these and never with generated protobuf classes (DESIGN.md,
import direction); CRI messages that pass through criv untouched (ContainerConfig,
PodSandboxConfig, LinuxContainerResources) travel as serialized bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class AgentContainerState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class AgentHealth:
    agent_version: str
    api_version: int
    kernel_release: str
    cgroup_version: str


@dataclass(frozen=True)
class AgentContainerInfo:
    container_id: str
    state: AgentContainerState
    created_at_ns: int = 0
    started_at_ns: int = 0
    finished_at_ns: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0
    # serialized runtime.v1.LinuxContainerResources, b"" when the agent sent none
    resources: bytes = b""
    # serialized runtime.v1.ContainerUser (the process's uid, gid, groups), b"": none
    user: bytes = b""


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int
    timed_out: bool
    output_truncated: bool


@dataclass(frozen=True)
class AgentStats:
    container_id: str
    timestamp_ns: int
    cpu_usage_core_nanoseconds: int = 0
    memory_working_set_bytes: int = 0
    memory_usage_bytes: int = 0
    memory_rss_bytes: int = 0
    memory_page_faults: int = 0
    memory_major_page_faults: int = 0
    memory_available_bytes: int = 0
    writable_layer_bytes: int = 0
    writable_layer_inodes: int = 0
    process_count: int = 0


class AgentEventKind(StrEnum):
    CREATED = "created"
    STARTED = "started"
    EXITED = "exited"
    OOM = "oom"
    REMOVED = "removed"


@dataclass(frozen=True)
class AgentEvent:
    kind: AgentEventKind
    container_id: str
    timestamp_ns: int
    info: AgentContainerInfo | None = None


@dataclass(frozen=True)
class MountSpec:
    container_path: str
    agent_path: str


@dataclass(frozen=True)
class CreateContainerArgs:
    container_id: str
    sandbox_id: str
    config: bytes  # serialized runtime.v1.ContainerConfig
    sandbox_config: bytes  # serialized runtime.v1.PodSandboxConfig
    image_config_json: bytes
    rootfs: str
    mounts: list[MountSpec] = field(default_factory=list)
    pid_namespace_target: str = ""
    seccomp_profile_json: bytes = b""  # a Localhost profile read on the host


@dataclass(frozen=True)
class GuestInterface:
    """A vm pod's NIC as the guest configures it (found by MAC)."""

    mac: str
    addresses: tuple[str, ...] = ()  # CIDR
    mtu: int = 0


@dataclass(frozen=True)
class GuestRoute:
    destination: str  # CIDR
    gateway: str = ""


@dataclass(frozen=True)
class GuestNetwork:
    """The guest's network for SetupSandbox (vm pods): from the pod's CNI result."""

    interfaces: tuple[GuestInterface, ...] = ()
    routes: tuple[GuestRoute, ...] = ()


@dataclass(frozen=True)
class GuestIdentity:
    """What a pod VM takes on at SetupSandbox (a clone of a template wakes with the
    template's clock, RNG state and machine-id; its share and NIC arrive hot-plugged)."""

    entropy: bytes  # host random bytes for the guest's RNG (at most 512)
    host_time_ns: int  # CLOCK_REALTIME to set
    machine_id: str  # 32 lowercase hex characters
    share_tag: str = ""  # virtio-fs tag to mount at the guest's shared dir if not yet
    wait_seconds: int = 0  # how long the agent waits for a hot-plugged share or NIC
