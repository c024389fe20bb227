"""CRI RuntimeService protobuf <-> the sandbox layer's records and specs."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.json_format import MessageToDict

from criv.agent.types import AgentStats
from criv.cri.imagevolume import for_agent, image_fields, status_image
from criv.sandbox import isostate
from criv.sandbox.isostate import HostState
from criv.sandbox.podresources import sizing_inputs
from criv.sandbox.records import ContainerRecord, MountRecord, PodRecord, PortMap
from criv.sandbox.specs import ContainerFilter, ContainerSpec, PodFilter, PodSpec
from criv.sandbox.states import ContainerState, PodState
from criv.sandbox.userns import IdMapping, UserNs
from criv_agent.api.runtime.v1 import api_pb2

_PROTOCOLS = {api_pb2.TCP: "tcp", api_pb2.UDP: "udp", api_pb2.SCTP: "sctp"}
_CONTAINER_STATES = {
    ContainerState.CREATED: api_pb2.CONTAINER_CREATED,
    ContainerState.RUNNING: api_pb2.CONTAINER_RUNNING,
    ContainerState.EXITED: api_pb2.CONTAINER_EXITED,
    ContainerState.UNKNOWN: api_pb2.CONTAINER_UNKNOWN,
}
_CONTAINER_STATES_BACK = {v: k for k, v in _CONTAINER_STATES.items()}


def pod_spec(req: api_pb2.RunPodSandboxRequest) -> PodSpec:
    cfg = req.config
    ns = cfg.linux.security_context.namespace_options
    return PodSpec(
        name=cfg.metadata.name,
        namespace=cfg.metadata.namespace,
        uid=cfg.metadata.uid,
        attempt=cfg.metadata.attempt,
        config=cfg.SerializeToString(),
        handler=req.runtime_handler,
        labels=dict(cfg.labels),
        annotations=dict(cfg.annotations),
        log_directory=cfg.log_directory,
        host_network=ns.network == api_pb2.NODE,
        host_namespaces=tuple(
            name
            for name, mode in (
                ("hostNetwork", ns.network),
                ("hostPID", ns.pid),
                ("hostIPC", ns.ipc),
            )
            if mode == api_pb2.NODE
        ),
        port_mappings=tuple(
            PortMap(
                host_port=p.host_port,
                container_port=p.container_port,
                protocol=_PROTOCOLS.get(p.protocol, "tcp"),
                host_ip=p.host_ip,
            )
            for p in cfg.port_mappings
        ),
        resources=sizing_inputs(cfg.linux.resources, cfg.linux.overhead),
        userns=userns_of(ns),
    )


def container_spec(req: api_pb2.CreateContainerRequest) -> ContainerSpec:
    cfg = req.config
    return ContainerSpec(
        name=cfg.metadata.name,
        attempt=cfg.metadata.attempt,
        config=for_agent(cfg),
        image=cfg.image.image,
        labels=dict(cfg.labels),
        annotations=dict(cfg.annotations),
        log_path=cfg.log_path,
        mounts=tuple(
            MountRecord(
                container_path=m.container_path,
                host_path=m.host_path,
                readonly=m.readonly,
                selinux_relabel=m.selinux_relabel,
                propagation=int(m.propagation),
                recursive_read_only=m.recursive_read_only,
                **image_fields(m),
            )
            for m in cfg.mounts
        ),
        resources=cfg.linux.resources.SerializeToString() if cfg.linux.HasField("resources")
        else b"",
        seccomp_localhost=seccomp_localhost(cfg.linux.security_context),
        userns=userns_of(cfg.linux.security_context.namespace_options),
    )  # fmt: skip


def userns_of(ns: api_pb2.NamespaceOption) -> UserNs | None:
    """userns_options mode POD as the sandbox layer takes it (validated: POD or NODE)."""
    u = ns.userns_options
    if not ns.HasField("userns_options") or u.mode != api_pb2.POD:
        return None
    return UserNs(
        uids=tuple(IdMapping(m.container_id, m.host_id, m.length) for m in u.uids),
        gids=tuple(IdMapping(m.container_id, m.host_id, m.length) for m in u.gids),
    )


def seccomp_localhost(sc: api_pb2.LinuxContainerSecurityContext) -> str:
    """The Localhost seccomp profile's host path, as the agent picks the profile: the
    typed field, else the deprecated ``localhost/<path>``; none for privileged."""
    if sc.privileged:
        return ""
    if sc.HasField("seccomp"):
        p = sc.seccomp
        return p.localhost_ref if p.profile_type == api_pb2.SecurityProfile.Localhost else ""
    path = sc.seccomp_profile_path
    return path[len("localhost/") :] if path.startswith("localhost/") else ""


def pod_filter(f: api_pb2.PodSandboxFilter) -> PodFilter:
    state = None
    if f.HasField("state"):
        state = PodState.READY if f.state.state == api_pb2.SANDBOX_READY else PodState.NOTREADY
    return PodFilter(id=f.id, state=state, labels=dict(f.label_selector))


def container_filter(f: api_pb2.ContainerFilter) -> ContainerFilter:
    state = _CONTAINER_STATES_BACK.get(f.state.state) if f.HasField("state") else None
    return ContainerFilter(
        id=f.id, state=state, pod_sandbox_id=f.pod_sandbox_id, labels=dict(f.label_selector)
    )


def _pod_config(pod: PodRecord) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig.FromString(pod.config)


def _pod_state(pod: PodRecord) -> int:
    return api_pb2.SANDBOX_READY if pod.state is PodState.READY else api_pb2.SANDBOX_NOTREADY


def _pod_meta(pod: PodRecord) -> api_pb2.PodSandboxMetadata:
    return api_pb2.PodSandboxMetadata(
        name=pod.name, uid=pod.uid, namespace=pod.namespace, attempt=pod.attempt
    )


def pod_sandbox(pod: PodRecord) -> api_pb2.PodSandbox:
    return api_pb2.PodSandbox(
        id=pod.id,
        metadata=_pod_meta(pod),
        state=_pod_state(pod),  # type: ignore[arg-type]
        created_at=pod.created_at_ns,
        labels=pod.labels,
        annotations=pod.annotations,
        runtime_handler=pod.handler,
    )


def pod_status(pod: PodRecord) -> api_pb2.PodSandboxStatus:
    ips = list(pod.ips) if pod.network_ready else []
    options = _pod_config(pod).linux.security_context.namespace_options
    return api_pb2.PodSandboxStatus(
        id=pod.id,
        metadata=_pod_meta(pod),
        state=_pod_state(pod),  # type: ignore[arg-type]
        created_at=pod.created_at_ns,
        network=api_pb2.PodSandboxNetworkStatus(
            ip=ips[0] if ips else "",
            additional_ips=[api_pb2.PodIP(ip=ip) for ip in ips[1:]],
        ),
        linux=api_pb2.LinuxPodSandboxStatus(namespaces=api_pb2.Namespace(options=options)),
        labels=pod.labels,
        annotations=pod.annotations,
        runtime_handler=pod.handler,
    )


def pod_verbose_info(pod: PodRecord, state_dir: str) -> dict[str, str]:
    info: dict[str, Any] = {
        "id": pod.id,
        "state": pod.state.value,
        "isolation": pod.isolation,
        "isolationReason": pod.isolation_reason,
        "runtimeHandler": pod.handler,
        "pid": st.pid if isinstance(st := pod.isolation_state, HostState) else 0,
        "isolationState": isostate.encode(pod.isolation_state) or {},
        "netNamespace": pod.netns,
        "hostNetwork": pod.host_network,
        "cniResult": pod.cni_result,
        "cniNetwork": pod.cni_network.get("name", ""),
        "stateDir": state_dir,
        "config": MessageToDict(_pod_config(pod)),
        "message": pod.message,
    }
    return {"info": json.dumps(info, sort_keys=True)}


def _container_meta(c: ContainerRecord) -> api_pb2.ContainerMetadata:
    return api_pb2.ContainerMetadata(name=c.name, attempt=c.attempt)


def container(c: ContainerRecord) -> api_pb2.Container:
    return api_pb2.Container(
        id=c.id,
        pod_sandbox_id=c.sandbox_id,
        metadata=_container_meta(c),
        image=api_pb2.ImageSpec(image=c.image),
        image_ref=c.image_ref,
        image_id=c.image_id,
        state=_CONTAINER_STATES[c.state],
        created_at=c.created_at_ns,
        labels=c.labels,
        annotations=c.annotations,
    )


def container_status(c: ContainerRecord) -> api_pb2.ContainerStatus:
    resources = None
    if c.resources:
        resources = api_pb2.ContainerResources(
            linux=api_pb2.LinuxContainerResources.FromString(c.resources)
        )
    return api_pb2.ContainerStatus(
        id=c.id,
        metadata=_container_meta(c),
        state=_CONTAINER_STATES[c.state],
        created_at=c.created_at_ns,
        started_at=c.started_at_ns,
        finished_at=c.finished_at_ns,
        exit_code=c.exit_code,
        image=api_pb2.ImageSpec(image=c.image),
        image_ref=c.image_ref,
        image_id=c.image_id,
        reason=c.reason,
        message=c.message,
        labels=c.labels,
        annotations=c.annotations,
        mounts=[
            api_pb2.Mount(
                container_path=m.container_path,
                host_path=m.host_path,
                readonly=m.readonly,
                selinux_relabel=m.selinux_relabel,
                propagation=m.propagation,  # type: ignore[arg-type]
                recursive_read_only=m.recursive_read_only,
                image=status_image(m),
                image_sub_path=m.image_sub_path,
            )
            for m in c.mounts
        ],
        log_path=c.log_path,
        resources=resources,
        user=api_pb2.ContainerUser.FromString(c.user) if c.user else None,
    )


def container_verbose_info(c: ContainerRecord) -> dict[str, str]:
    info = {
        "id": c.id,
        "sandboxID": c.sandbox_id,
        "pid": c.pid,
        "rootfs": c.rootfs,
        "logPath": c.log_path,
        "logDone": c.log_done,
        "config": MessageToDict(api_pb2.ContainerConfig.FromString(c.config)),
    }
    return {"info": json.dumps(info, sort_keys=True)}


def _u64(v: int) -> api_pb2.UInt64Value:
    return api_pb2.UInt64Value(value=max(v, 0))


def container_stats(
    c: ContainerRecord, s: AgentStats | None, nano_cores: int | None, mountpoint: str
) -> api_pb2.ContainerStats:
    out = api_pb2.ContainerStats(
        attributes=api_pb2.ContainerAttributes(
            id=c.id, metadata=_container_meta(c), labels=c.labels, annotations=c.annotations
        )
    )
    if s is None:
        return out
    ts = s.timestamp_ns
    out.cpu.CopyFrom(
        api_pb2.CpuUsage(
            timestamp=ts,
            usage_core_nano_seconds=_u64(s.cpu_usage_core_nanoseconds),
            usage_nano_cores=_u64(nano_cores) if nano_cores is not None else None,
        )
    )
    out.memory.CopyFrom(
        api_pb2.MemoryUsage(
            timestamp=ts,
            working_set_bytes=_u64(s.memory_working_set_bytes),
            available_bytes=_u64(s.memory_available_bytes),
            usage_bytes=_u64(s.memory_usage_bytes),
            rss_bytes=_u64(s.memory_rss_bytes),
            page_faults=_u64(s.memory_page_faults),
            major_page_faults=_u64(s.memory_major_page_faults),
        )
    )
    out.writable_layer.CopyFrom(
        api_pb2.FilesystemUsage(
            timestamp=ts,
            fs_id=api_pb2.FilesystemIdentifier(mountpoint=mountpoint),
            used_bytes=_u64(s.writable_layer_bytes),
            inodes_used=_u64(s.writable_layer_inodes),
        )
    )
    return out


def pod_stats(
    pod: PodRecord, containers: list[api_pb2.ContainerStats], process_count: int, ts: int
) -> api_pb2.PodSandboxStats:
    def total(get: Any) -> int:
        return sum(get(c) for c in containers)

    linux = api_pb2.LinuxPodSandboxStats(
        cpu=api_pb2.CpuUsage(
            timestamp=ts,
            usage_core_nano_seconds=_u64(total(lambda c: c.cpu.usage_core_nano_seconds.value)),
            usage_nano_cores=_u64(total(lambda c: c.cpu.usage_nano_cores.value)),
        ),
        memory=api_pb2.MemoryUsage(
            timestamp=ts,
            working_set_bytes=_u64(total(lambda c: c.memory.working_set_bytes.value)),
            usage_bytes=_u64(total(lambda c: c.memory.usage_bytes.value)),
            rss_bytes=_u64(total(lambda c: c.memory.rss_bytes.value)),
            page_faults=_u64(total(lambda c: c.memory.page_faults.value)),
            major_page_faults=_u64(total(lambda c: c.memory.major_page_faults.value)),
        ),
        process=api_pb2.ProcessUsage(timestamp=ts, process_count=_u64(process_count)),
        containers=containers,
    )
    return api_pb2.PodSandboxStats(
        attributes=api_pb2.PodSandboxAttributes(
            id=pod.id, metadata=_pod_meta(pod), labels=pod.labels, annotations=pod.annotations
        ),
        linux=linux,
    )
