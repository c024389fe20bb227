"""The host process that carries a pod, found through criv's records: a vm pod's QEMU
(libvirt's pid file for the domain its record names), a host pod's agent (the pid and
start time its record holds); and the vm pod's vsock backend. Blocking (reads /proc)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from criv.cri.client import PodView
from criv.hypervisor.libvirtbase import qemu_pid
from criv.ops import procinfo
from criv.procscan import same_process


@dataclass(frozen=True)
class HostProcess:
    role: str  # "qemu" | "agent" | "vsock-backend"
    pid: int  # 0: not running
    memory: procinfo.Memory | None
    uptime_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "pid": self.pid,
            "rssKiB": self.memory.rss_kib if self.memory else None,
            "pssKiB": self.memory.pss_kib if self.memory else None,
            "uptimeSeconds": round(self.uptime_s, 1) if self.uptime_s is not None else None,
        }


def _process(role: str, pid: int) -> HostProcess:
    if pid <= 0:
        return HostProcess(role, 0, None, None)
    return HostProcess(role, pid, procinfo.memory(pid), procinfo.uptime_seconds(pid))


def _int(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    return v if isinstance(v, int) else 0


def main_process(pod: PodView) -> HostProcess | None:
    """The pod's VM (QEMU) or agent process; None for a mode with neither."""
    st = pod.isolation_state
    if pod.mode == "vm":
        domain = st.get("domain")
        return _process("qemu", qemu_pid(domain) if isinstance(domain, str) and domain else 0)
    if pod.mode == "host":
        pid = _int(st, "pid")
        return _process("agent", pid if same_process(pid, _int(st, "start_time")) else 0)
    return None


def backend_process(pod: PodView) -> HostProcess | None:
    """A vm pod's vsock backend (None: not a vm pod, or kernel vsock)."""
    st = pod.isolation_state
    pid = _int(st, "backend_pid")
    if pod.mode != "vm" or not pid:
        return None
    return _process(
        "vsock-backend", pid if same_process(pid, _int(st, "backend_start_time")) else 0
    )


def vsock_status(pod: PodView) -> dict[str, Any]:
    st = pod.isolation_state
    return procinfo.vsock_status(_int(st, "backend_pid"), _int(st, "backend_start_time"))
