"""`criv pods` and `criv containers`: what runs on this node, as tables (or JSON).

PID is the host process that carries the pod: a vm pod's QEMU, a host pod's agent.
MEMORY is that process's RSS (a vm pod: the whole VM as the host pays for it); for a
container it is the container's working set from CRI stats. UPTIME is the process's
(a pod) or since the container started.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from criv.config import Config
from criv.cri.client import ContainerView, CriClient, PodView
from criv.ops.podproc import HostProcess, main_process

NONE = "-"


def human_bytes(n: int | None) -> str:
    if n is None:
        return NONE
    value = float(n)
    for unit in ("B", "Ki", "Mi", "Gi"):
        if value < 1024 or unit == "Gi":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]  # fmt: skip
    return "\n".join(lines)


def _proc_cells(proc: HostProcess | None) -> list[str]:
    if proc is None or not proc.pid:
        return [NONE, NONE, NONE]
    mem = proc.memory.rss_kib * 1024 if proc.memory else None
    return [str(proc.pid), human_bytes(mem), human_duration(proc.uptime_s)]


POD_HEADER = ("POD ID", "NAME", "NAMESPACE", "MODE", "STATE", "IP", "PID", "MEMORY", "UPTIME")


def pod_rows(pods: list[PodView], procs: dict[str, HostProcess | None]) -> list[list[str]]:
    return [
        [p.id[:13], p.name, p.namespace, p.mode, p.state, p.ips[0] if p.ips else NONE,
         *_proc_cells(procs.get(p.id))]
        for p in pods
    ]  # fmt: skip


CONTAINER_HEADER = (
    "CONTAINER ID", "NAME", "POD", "NAMESPACE", "MODE", "STATE", "IP", "PID", "MEMORY", "UPTIME",
)  # fmt: skip


def container_rows(
    containers: list[ContainerView],
    pods: dict[str, PodView],
    procs: dict[str, HostProcess | None],
    now_ns: int,
) -> list[list[str]]:
    rows = []
    for c in containers:
        pod = pods.get(c.pod_id)
        pod_proc = procs.get(c.pod_id)
        # a vm pod's container pids are guest pids: the host process is its VM's QEMU
        if pod is not None and pod.mode == "vm":
            pid = str(pod_proc.pid) if pod_proc and pod_proc.pid else NONE
        else:
            pid = str(c.pid) if c.pid and c.state == "running" else NONE
        up = (now_ns - c.started_at_ns) / 1e9 if c.state == "running" and c.started_at_ns else None
        rows.append([
            c.id[:13], c.name, pod.name if pod else c.pod_id[:13],
            pod.namespace if pod else NONE, pod.mode if pod else NONE, c.state,
            pod.ips[0] if pod and pod.ips else NONE, pid,
            human_bytes(c.working_set_bytes), human_duration(up),
        ])  # fmt: skip
    return rows


def _pod_json(p: PodView, proc: HostProcess | None) -> dict[str, Any]:
    return {
        "id": p.id, "name": p.name, "namespace": p.namespace, "mode": p.mode,
        "state": p.state, "ips": p.ips, "containers": p.container_ids,
        "process": proc.to_dict() if proc else None,
    }  # fmt: skip


def pods_command(cfg: Config, as_json: bool) -> str:
    with CriClient(cfg.socket_path) as cri:
        pods = cri.pods()
    procs = {p.id: main_process(p) for p in pods}
    if as_json:
        return json.dumps([_pod_json(p, procs[p.id]) for p in pods], indent=2)
    return render(POD_HEADER, pod_rows(pods, procs))


def containers_command(cfg: Config, as_json: bool) -> str:
    with CriClient(cfg.socket_path) as cri:
        containers = cri.containers()
        pods = {p.id: p for p in cri.pods()}
    procs = {pid: main_process(p) for pid, p in pods.items() if p.mode == "vm"}
    if as_json:
        return json.dumps(
            [{"id": c.id, "name": c.name, "podId": c.pod_id, "state": c.state,
              "image": c.image, "pid": c.pid, "workingSetBytes": c.working_set_bytes}
             for c in containers],
            indent=2,
        )  # fmt: skip
    return render(CONTAINER_HEADER, container_rows(containers, pods, procs, time.time_ns()))
