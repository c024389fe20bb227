"""What the CRI layer hands the sandbox layer (proto-free), and list filters.

CRI configs travel twice: the fields criv itself acts on are lifted into these
dataclasses, and the whole message rides along serialized (``config``) for the agent,
which builds the OCI spec from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from criv.sandbox.records import (
    ContainerRecord,
    MountRecord,
    PodRecord,
    PortMap,
    pod_reserved_name,
)
from criv.sandbox.states import ContainerState, PodState
from criv.sandbox.userns import UserNs


@dataclass(frozen=True)
class PodSpec:
    name: str
    namespace: str
    uid: str
    attempt: int
    config: bytes
    handler: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_directory: str = ""
    host_network: bool = False
    # the host namespaces the pod asks for, as kubelet names them: "hostNetwork",
    # "hostPID", "hostIPC" (namespace_options network/pid/ipc NODE)
    host_namespaces: tuple[str, ...] = ()
    port_mappings: tuple[PortMap, ...] = ()
    # pod-level resources + overhead (LinuxPodSandboxConfig), as plain integers keyed like
    # criv.hypervisor.sizing.PodResources: what sizes a vm pod's VM
    resources: dict[str, int] = field(default_factory=dict)
    # userns_options mode POD: the pod's mappings (None: the node's user namespace)
    userns: UserNs | None = None

    @property
    def reserved_name(self) -> str:
        return pod_reserved_name(self.name, self.namespace, self.uid, self.attempt)


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    attempt: int
    config: bytes
    image: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    mounts: tuple[MountRecord, ...] = ()
    resources: bytes = b""
    # the seccomp Localhost profile's host path ("" for none): criv reads it for the agent
    seccomp_localhost: str = ""
    # userns_options mode POD: the container's mappings (kubelet sends the pod's)
    userns: UserNs | None = None


@dataclass(frozen=True)
class PodFilter:
    id: str = ""
    state: PodState | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ContainerFilter:
    id: str = ""
    state: ContainerState | None = None
    pod_sandbox_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """CRI label selectors are equality-only: every pair must be present."""
    return all(labels.get(k) == v for k, v in selector.items())


def match_pod(f: PodFilter, pod: PodRecord) -> bool:
    if f.id and not pod.id.startswith(f.id):
        return False
    if f.state is not None:
        # PENDING pods are NOTREADY as far as CRI knows.
        shown = PodState.READY if pod.state is PodState.READY else PodState.NOTREADY
        if shown is not f.state:
            return False
    return labels_match(f.labels, pod.labels)


def match_container(f: ContainerFilter, c: ContainerRecord) -> bool:
    if f.id and not c.id.startswith(f.id):
        return False
    if f.pod_sandbox_id and not c.sandbox_id.startswith(f.pod_sandbox_id):
        return False
    if f.state is not None and c.state is not f.state:
        return False
    return labels_match(f.labels, c.labels)
