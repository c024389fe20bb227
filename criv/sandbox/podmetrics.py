"""What criv measures of a pod on the host, beside the agent's container stats.

- the pod's network interfaces, read in its network namespace (``/proc/net/dev`` there):
  the CNI interfaces a ``host`` pod's containers use, or those a ``vm`` pod's tap is
  joined to (the tap itself, criv's plumbing, is left out);
- the pod's own cost on the host: a ``host`` pod's cgroup (:mod:`.podcgroup`); for a
  ``vm`` pod the processes that make its VM (QEMU, the vsock backend, virtiofsd and
  their children), whose CPU time includes everything the guest ran.

Blocking (procfs, a subprocess): call from a thread, or await :func:`pod_usage`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from criv.commands import run_command
from criv.errors import CrivError
from criv.hypervisor.libvirtbase import qemu_pid
from criv.network.tap import tap_name
from criv.procscan import cpu_ns, same_process
from criv.sandbox import podcgroup
from criv.sandbox.isolation import PodPaths
from criv.sandbox.isostate import VmState
from criv.sandbox.records import PodRecord
from criv.sandbox.vm import virtiofs
from criv.sandbox.vm.spares import vm_domain

log = logging.getLogger("criv.sandbox.podmetrics")

PROC = Path("/proc")


@dataclass(frozen=True)
class InterfaceUsage:
    name: str
    rx_bytes: int
    rx_packets: int
    rx_errors: int
    rx_dropped: int
    tx_bytes: int
    tx_packets: int
    tx_errors: int
    tx_dropped: int


@dataclass(frozen=True)
class HostCost:
    """The pod's use of the host: its cgroup (host) or its VM's processes (vm)."""

    cpu_ns: int
    memory_usage: int
    working_set: int
    rss: int


@dataclass(frozen=True)
class PodUsage:
    interfaces: tuple[InterfaceUsage, ...] = ()
    host: HostCost | None = None


def parse_net_dev(text: str, skip: frozenset[str]) -> tuple[InterfaceUsage, ...]:
    """``/proc/net/dev``: two header lines, then ``name: rx(8 fields) tx(8 fields)``."""
    out = []
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        name = name.strip()
        f = rest.split()
        if not sep or name in skip or len(f) < 16 or not all(x.isdigit() for x in f):
            continue
        v = [int(x) for x in f]
        out.append(InterfaceUsage(name, v[0], v[1], v[2], v[3], v[8], v[9], v[10], v[11]))
    return tuple(out)


async def _interfaces(pod: PodRecord) -> tuple[InterfaceUsage, ...]:
    if pod.host_network or not pod.netns:
        return ()  # the host's interfaces are not the pod's
    try:
        rc, out = await run_command(
            "nsenter", f"--net={pod.netns}", "--", "cat", "/proc/net/dev", merge_stderr=False
        )
    except CrivError as e:
        log.warning("pod %s: network stats: %s", pod.id[:12], e)
        return ()
    if rc != 0:
        log.warning("pod %s: network stats: nsenter exited %d", pod.id[:12], rc)
        return ()
    return parse_net_dev(out, frozenset({"lo", tap_name(pod.id)}))


def _tree(roots: list[int]) -> set[int]:
    """``roots`` and all their descendants (``/proc/<pid>/task/<tid>/children``)."""
    seen: set[int] = set()
    todo = [p for p in roots if p > 0]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            tasks = list((PROC / str(pid) / "task").iterdir())
        except OSError:
            continue
        for t in tasks:
            try:
                todo += [int(c) for c in (t / "children").read_text().split()]
            except (OSError, ValueError):
                continue
    return seen


def _process_cost(pid: int) -> tuple[int, int, int] | None:
    """(cpu ns, resident bytes, anonymous resident bytes) of one process."""
    cpu = cpu_ns(pid)
    try:
        status = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    if cpu is None:
        return None
    kb = {}
    for line in status.splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon"):
            kb[k] = int(v.split()[0]) * 1024
    return cpu, kb.get("VmRSS", 0), kb.get("RssAnon", 0)


def vm_processes(pod: PodRecord, paths: PodPaths) -> list[int]:
    """The live processes of a vm pod's VM on the host: QEMU, backend, virtiofsd."""
    st = pod.isolation_state
    if not isinstance(st, VmState):
        return []
    roots = [qemu_pid(vm_domain(pod.id, st))]
    if same_process(st.backend_pid, st.backend_start_time):
        roots.append(st.backend_pid)
    roots += virtiofs.pids(str(virtiofs.fs_socket(paths)))
    return sorted(_tree(roots))


def vm_cost(pod: PodRecord, paths: PodPaths) -> HostCost | None:
    costs = [c for c in map(_process_cost, vm_processes(pod, paths)) if c is not None]
    if not costs:
        return None
    rss = sum(c[1] for c in costs)
    return HostCost(sum(c[0] for c in costs), rss, rss, sum(c[2] for c in costs))


def host_cost(pod: PodRecord) -> HostCost | None:
    u = podcgroup.read_usage(podcgroup.pod_cgroup(pod))
    return None if u is None else HostCost(u.cpu_ns, u.memory_usage, u.working_set, u.rss)


async def pod_usage(pod: PodRecord, paths: PodPaths) -> PodUsage:
    interfaces = await _interfaces(pod)
    if isinstance(pod.isolation_state, VmState):
        host = await asyncio.to_thread(vm_cost, pod, paths)
    else:
        host = await asyncio.to_thread(host_cost, pod)
    return PodUsage(interfaces, host)
