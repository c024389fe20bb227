"""Pod and container records: what criv knows of each, persisted as versioned JSON.

Records are immutable (frozen dataclasses); :class:`criv.sandbox.store.Store` holds
them and is the one way to change them. Version history: pod records v1 kept
``isolation_state`` as a free-form dict; v2 keeps the mode's typed state
(:mod:`criv.sandbox.isostate`, ``null`` before boot). Both are read.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from criv.sandbox import isostate
from criv.sandbox.isostate import IsolationState
from criv.sandbox.states import ContainerState, PodState, check_container, check_pod

POD_KIND = "sandbox"
POD_VERSION = 2
CONTAINER_KIND = "container"
CONTAINER_VERSION = 1


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any) -> bytes:
    return base64.b64decode(s) if isinstance(s, str) else b""


def pod_reserved_name(name: str, namespace: str, uid: str, attempt: int) -> str:
    """containerd's sandbox name: the key a pod's name is reserved under."""
    return f"{name}_{namespace}_{uid}_{attempt}"


@dataclass(frozen=True)
class PortMap:
    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""


@dataclass(frozen=True)
class PodRecord:
    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    state: PodState
    created_at_ns: int
    handler: str
    isolation: str  # "host" | "vm"
    config: bytes  # serialized runtime.v1.PodSandboxConfig, passed to the agent as is
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_directory: str = ""
    host_network: bool = False
    port_mappings: tuple[PortMap, ...] = ()
    netns: str = ""
    # The CNI list as it was at ADD time and its final result: what DEL needs.
    cni_network: dict[str, Any] = field(default_factory=dict)
    cni_result: dict[str, Any] = field(default_factory=dict)
    ips: tuple[str, ...] = ()
    network_ready: bool = False
    # What the isolation mode needs to find its agent again (None until booted).
    isolation_state: IsolationState | None = None
    message: str = ""
    # pod-level resources (see PodSpec.resources): the VM size of a vm pod
    resources: dict[str, int] = field(default_factory=dict)
    # why the pod runs in another mode than its handler's ("" when it does not): a
    # policy such as runtime.host_namespace_pods
    isolation_reason: str = ""

    @property
    def reserved_name(self) -> str:
        return pod_reserved_name(self.name, self.namespace, self.uid, self.attempt)

    def container_reserved_name(self, name: str, attempt: int) -> str:
        """The key a container's name is reserved under in this pod (as containerd)."""
        return f"{name}_{self.name}_{self.namespace}_{self.uid}_{attempt}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        d["config"] = _b64(self.config)
        d["isolation_state"] = isostate.encode(self.isolation_state)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], version: int = POD_VERSION) -> PodRecord:
        d = dict(d)
        d["state"] = PodState(d["state"])
        # v1 and v2 store the same keys (v1: {} before boot, v2: null)
        d["isolation_state"] = isostate.decode(
            str(d.get("isolation", "")), d.get("isolation_state")
        )
        d["config"] = _unb64(d.get("config"))
        d["port_mappings"] = tuple(PortMap(**p) for p in d.get("port_mappings", ()))
        d["ips"] = tuple(d.get("ips", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class MountRecord:
    container_path: str
    host_path: str
    readonly: bool = False
    selinux_relabel: bool = False
    propagation: int = 0  # runtime.v1.MountPropagation value
    recursive_read_only: bool = False
    # an image volume (host_path ""): the image as the caller named it, the sub-path,
    # and what it resolved to at create time (id, digested reference)
    image: str = ""
    image_sub_path: str = ""
    image_id: str = ""
    image_ref: str = ""


@dataclass(frozen=True)
class ContainerRecord:
    id: str
    sandbox_id: str
    name: str
    attempt: int
    state: ContainerState
    created_at_ns: int
    config: bytes  # serialized runtime.v1.ContainerConfig
    image: str  # as the caller named it
    image_id: str
    image_ref: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_path: str = ""  # absolute host path, "" when kubelet gave none
    mounts: tuple[MountRecord, ...] = ()
    rootfs: str = ""
    started_at_ns: int = 0
    finished_at_ns: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0
    resources: bytes = b""  # serialized runtime.v1.LinuxContainerResources
    log_done: bool = False
    user: bytes = b""  # serialized runtime.v1.ContainerUser, as the agent resolved it

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        d["config"] = _b64(self.config)
        d["resources"] = _b64(self.resources)
        d["user"] = _b64(self.user)
        return d

    def reserved_name(self, pod: PodRecord) -> str:
        return pod.container_reserved_name(self.name, self.attempt)

    @classmethod
    def from_dict(cls, d: dict[str, Any], version: int = CONTAINER_VERSION) -> ContainerRecord:
        d = dict(d)
        d["state"] = ContainerState(d["state"])
        d["config"] = _unb64(d.get("config"))
        d["resources"] = _unb64(d.get("resources"))
        d["user"] = _unb64(d.get("user"))
        d["mounts"] = tuple(MountRecord(**m) for m in d.get("mounts", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def check_pod_record(old: PodRecord, new: PodRecord) -> None:
    check_pod(old.state, new.state, f"pod {old.id[:12]}")


def check_container_record(old: ContainerRecord, new: ContainerRecord) -> None:
    check_container(old.state, new.state, f"container {old.id[:12]}")
