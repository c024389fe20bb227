"""What each isolation mode records to find a pod's agent again: one typed dataclass per
mode, stored in :attr:`PodRecord.isolation_state` (``None`` until the mode booted it).

Pod records of version 1 held a free-form dict with the same keys; :func:`decode`
reads both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class HostState:
    """``host`` mode: the agent process, by pid plus start time (pids get reused)."""

    mode: ClassVar[str] = "host"
    pid: int = 0
    start_time: int = 0


@dataclass(frozen=True)
class VmState:
    """``vm`` mode: the libvirt domain, its vsock backend process and its network."""

    mode: ClassVar[str] = "vm"
    domain: str = ""
    uuid: str = ""
    accel: str = ""
    accel_reason: str = ""
    console_log: str = ""
    vcpus: int = 0  # now (UpdatePodSandboxResources may have hot-plugged some)
    max_vcpus: int = 0  # what the domain can grow to (0: its boot vCPUs, an older record)
    memory_mib: int = 0  # now (the balloon's target after a live resize)
    max_memory_mib: int = 0  # what the balloon can give up to (0: its boot memory, an older record)
    vsock: str = "backend"
    cid: int = 0
    backend_pid: int = 0
    backend_start_time: int = 0
    virtiofsd_pid: int = 0
    tap: str = ""
    mac: str = ""
    mtu: int = 0
    template: str = ""  # the template's key when the VM started as its clone ("": cold boot)


@dataclass(frozen=True)
class VmImageState:
    """A vm-image pod: no agent to find; its VM is its container's (booted at
    StartContainer), named ``domain``."""

    mode: ClassVar[str] = "vm-image"
    domain: str = ""


IsolationState = HostState | VmState | VmImageState


def start_kind(state: IsolationState | None) -> str:
    """How the pod's sandbox started, as ``criv_pod_start_duration_seconds`` labels it:
    "template" (a VM cloned from a template) or "cold"."""
    return "template" if isinstance(state, VmState) and state.template else "cold"


# mode name -> its state type; a new isolation mode adds one line here
STATE_TYPES: dict[str, type[HostState] | type[VmState] | type[VmImageState]] = {
    HostState.mode: HostState,
    VmState.mode: VmState,
    VmImageState.mode: VmImageState,
}


def encode(state: IsolationState | None) -> dict[str, Any] | None:
    return None if state is None else dataclasses.asdict(state)


def decode(mode: str, data: Any) -> IsolationState | None:
    """The typed state of a pod in ``mode`` from its record (``None``: not booted)."""
    cls = STATE_TYPES.get(mode)
    if cls is None or not isinstance(data, dict) or not data:
        return None
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})
