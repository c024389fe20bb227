"""Linux namespaces of a container from CRI NamespaceOption.

Where the pod's namespaces live (see sandbox.py): the network namespace is the agent's own
(host mode: the agent is started inside the pod netns; vm mode: the guest's); ipc, uts and
a shared pid namespace are held by the pod's holder process, which containers join by
``/proc/<holder>/ns/...`` paths. NODE means the agent's own namespace (= the node's for
host-network/host-pid pods in host mode, the guest's in a VM), so nothing is unshared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.errors import InvalidArgument

POD = api_pb2.NamespaceMode.POD
CONTAINER = api_pb2.NamespaceMode.CONTAINER
NODE = api_pb2.NamespaceMode.NODE
TARGET = api_pb2.NamespaceMode.TARGET


@dataclass(frozen=True)
class PodNamespaces:
    """Paths of the pod's namespaces as crun must join them; None = not held."""

    net: str | None = None
    ipc: str | None = None
    uts: str | None = None
    pid: str | None = None


def namespaces(
    opts: api_pb2.NamespaceOption,
    pod: PodNamespaces,
    target_pid: str | None,
    cgroup_v2: bool,
    privileged: bool,
) -> list[dict[str, Any]]:
    ns: list[dict[str, Any]] = [{"type": "mount"}]

    def join(kind: str, path: str | None) -> None:
        ns.append({"type": kind, "path": path} if path else {"type": kind})

    if opts.network == CONTAINER:
        ns.append({"type": "network"})
    elif opts.network == POD and pod.net:
        # joining explicitly (not inheriting) lets crun apply net.* sysctls
        join("network", pod.net)
    if opts.network != NODE:
        # hostname comes from the pod's UTS namespace (set by the holder)
        join("uts", pod.uts)
    if opts.ipc == POD:
        join("ipc", pod.ipc)
    elif opts.ipc == CONTAINER:
        ns.append({"type": "ipc"})
    if opts.pid == POD:
        join("pid", pod.pid)
    elif opts.pid == CONTAINER:
        ns.append({"type": "pid"})
    elif opts.pid == TARGET:
        if not target_pid:
            raise InvalidArgument("pid namespace TARGET without a running target container")
        join("pid", target_pid)
    if cgroup_v2 and not privileged:
        ns.append({"type": "cgroup"})
    return ns
