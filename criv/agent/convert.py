"""Agent protobuf <-> criv.agent.types, with every string from the agent clipped."""

from __future__ import annotations

from criv.agent.types import (
    AgentContainerInfo,
    AgentContainerState,
    AgentEvent,
    AgentEventKind,
    AgentHealth,
    AgentStats,
    CreateContainerArgs,
    ExecResult,
    GuestIdentity,
    GuestNetwork,
)
from criv.errors import AgentError
from criv_agent.api.agent.v1 import agent_pb2
from criv_agent.api.runtime.v1 import api_pb2

MAX_TEXT = 4096
MAX_ID = 256
# a container's resources as the agent reports them; a real one is a few hundred bytes
MAX_RESOURCES = 16 * 1024
# a container's user (uid, gid, groups): the kernel takes at most 65536 groups
MAX_USER = 64 * 1024

_STATES = {
    agent_pb2.CREATED: AgentContainerState.CREATED,
    agent_pb2.RUNNING: AgentContainerState.RUNNING,
    agent_pb2.EXITED: AgentContainerState.EXITED,
    agent_pb2.UNKNOWN: AgentContainerState.UNKNOWN,
}
_EVENTS = {
    agent_pb2.Event.CREATED: AgentEventKind.CREATED,
    agent_pb2.Event.STARTED: AgentEventKind.STARTED,
    agent_pb2.Event.EXITED: AgentEventKind.EXITED,
    agent_pb2.Event.OOM: AgentEventKind.OOM,
    agent_pb2.Event.REMOVED: AgentEventKind.REMOVED,
}


def _clip(s: str, n: int = MAX_TEXT) -> str:
    return s[:n]


def health(resp: agent_pb2.HealthResponse) -> AgentHealth:
    return AgentHealth(
        agent_version=_clip(resp.agent_version, 128),
        api_version=resp.api_version,
        kernel_release=_clip(resp.kernel_release, 256),
        cgroup_version=_clip(resp.cgroup_version, 8),
    )


def container_info(info: agent_pb2.ContainerInfo, expect_id: str | None) -> AgentContainerInfo:
    if expect_id is not None and info.container_id not in ("", expect_id):
        raise AgentError(
            f"agent answered about container {info.container_id[:MAX_ID]!r}, "
            f"asked about {expect_id!r}"
        )
    return AgentContainerInfo(
        container_id=expect_id or _clip(info.container_id, MAX_ID),
        state=_STATES.get(info.state, AgentContainerState.UNKNOWN),
        created_at_ns=max(info.created_at_ns, 0),
        started_at_ns=max(info.started_at_ns, 0),
        finished_at_ns=max(info.finished_at_ns, 0),
        exit_code=info.exit_code,
        reason=_clip(info.reason, 128),
        message=_clip(info.message),
        pid=info.pid,
        resources=_resources(info),
        user=_user(info),
    )


def _resources(info: agent_pb2.ContainerInfo) -> bytes:
    """Kept in the container record: an oversized answer is dropped, not stored."""
    if not info.HasField("resources"):
        return b""
    raw = info.resources.SerializeToString()
    return raw if len(raw) <= MAX_RESOURCES else b""


def _user(info: agent_pb2.ContainerInfo) -> bytes:
    """As ``_resources``: kept in the record, an oversized answer dropped."""
    if not info.HasField("user"):
        return b""
    raw = info.user.SerializeToString()
    return raw if len(raw) <= MAX_USER else b""


def exec_result(resp: agent_pb2.ExecSyncResponse, limit: int) -> ExecResult:
    truncated = resp.output_truncated or len(resp.stdout) > limit or len(resp.stderr) > limit
    return ExecResult(
        stdout=resp.stdout[:limit],
        stderr=resp.stderr[:limit],
        exit_code=resp.exit_code,
        timed_out=resp.timed_out,
        output_truncated=truncated,
    )


def stats(s: agent_pb2.ContainerStats) -> AgentStats:
    return AgentStats(
        container_id=_clip(s.container_id, MAX_ID),
        timestamp_ns=s.timestamp_ns,
        cpu_usage_core_nanoseconds=s.cpu_usage_core_nanoseconds,
        memory_working_set_bytes=s.memory_working_set_bytes,
        memory_usage_bytes=s.memory_usage_bytes,
        memory_rss_bytes=s.memory_rss_bytes,
        memory_page_faults=s.memory_page_faults,
        memory_major_page_faults=s.memory_major_page_faults,
        memory_available_bytes=s.memory_available_bytes,
        writable_layer_bytes=s.writable_layer_bytes,
        writable_layer_inodes=s.writable_layer_inodes,
        process_count=s.process_count,
    )


def event(ev: agent_pb2.Event) -> AgentEvent | None:
    kind = _EVENTS.get(ev.kind)
    if kind is None:
        return None
    info = container_info(ev.info, None) if ev.HasField("info") else None
    return AgentEvent(kind, _clip(ev.container_id, MAX_ID), ev.timestamp_ns, info)


def pod_config(raw: bytes) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig.FromString(raw)


def resources(raw: bytes) -> api_pb2.LinuxContainerResources:
    return api_pb2.LinuxContainerResources.FromString(raw)


def create_request(args: CreateContainerArgs) -> agent_pb2.CreateContainerRequest:
    return agent_pb2.CreateContainerRequest(
        container_id=args.container_id,
        sandbox_id=args.sandbox_id,
        config=api_pb2.ContainerConfig.FromString(args.config),
        sandbox_config=api_pb2.PodSandboxConfig.FromString(args.sandbox_config),
        image_config_json=args.image_config_json,
        rootfs=args.rootfs,
        mounts=[
            agent_pb2.ResolvedMount(container_path=m.container_path, agent_path=m.agent_path)
            for m in args.mounts
        ],
        pid_namespace_target=args.pid_namespace_target,
        seccomp_profile_json=args.seccomp_profile_json,
    )


def guest_network(n: GuestNetwork) -> agent_pb2.GuestNetwork:
    return agent_pb2.GuestNetwork(
        interfaces=[
            agent_pb2.GuestInterface(mac=i.mac, addresses=list(i.addresses), mtu=i.mtu)
            for i in n.interfaces
        ],
        routes=[
            agent_pb2.GuestRoute(destination=r.destination, gateway=r.gateway) for r in n.routes
        ],
    )


def guest_identity(g: GuestIdentity) -> agent_pb2.GuestIdentity:
    return agent_pb2.GuestIdentity(
        entropy=g.entropy,
        host_time_ns=g.host_time_ns,
        machine_id=g.machine_id,
        share_tag=g.share_tag,
        wait_seconds=g.wait_seconds,
    )


def pod_identity(raw: bytes) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(hostname, DNS servers, DNS searches) of a serialized PodSandboxConfig: what an
    in-process agent (vm-image pods) needs of it without touching protobuf itself."""
    cfg = pod_config(raw)
    dns = cfg.dns_config
    return cfg.hostname, tuple(dns.servers), tuple(dns.searches)


def container_annotations(raw: bytes) -> dict[str, str]:
    """The annotations of a serialized ContainerConfig."""
    return dict(api_pb2.ContainerConfig.FromString(raw).annotations)
