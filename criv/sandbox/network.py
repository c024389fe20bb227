"""A pod's network, as the sandbox layer needs it: a netns with CNI's interfaces in it.

:class:`PodNetwork` is what the pod services call; :class:`CniPodNetwork` does it as
containerd and CRI-O do (a netns file under criv's run dir, the configured CNI plugin
list run in it). Unit tests hand in a fake.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from criv.errors import CrivError
from criv.network.cni import Cni, NetworkList, PodNetworkRequest, PortMapping
from criv.network.netns import create_netns, delete_netns, list_netns, netns_exists, netns_path
from criv.sandbox.records import PodRecord
from criv.sandbox.states import PodState

log = logging.getLogger("criv.sandbox.network")


@dataclass(frozen=True)
class Attachment:
    """What CNI ADD gave a pod: kept in its record, since DEL needs it."""

    cni_network: dict[str, Any]  # the plugin list as it was at ADD time
    cni_result: dict[str, Any]
    ips: tuple[str, ...]


class PodNetwork(Protocol):
    def netns_for(self, pod_id: str) -> str: ...

    async def attach(self, pod: PodRecord) -> Attachment:
        """Create the pod's netns and run CNI ADD in it."""
        ...

    async def detach(self, pod: PodRecord) -> None:
        """CNI DEL with what ADD recorded (raises if it fails: retried later)."""
        ...

    async def remove_netns(self, pod: PodRecord) -> None: ...

    async def sweep(self, pods: list[PodRecord]) -> None:
        """Remove netns files no live pod owns."""
        ...


def _as_record(net: NetworkList) -> dict[str, Any]:
    return {"name": net.name, "cniVersion": net.cni_version, "plugins": net.plugins}


def network_request(pod: PodRecord) -> PodNetworkRequest:
    return PodNetworkRequest(
        sandbox_id=pod.id,
        netns=pod.netns,
        pod_name=pod.name,
        pod_namespace=pod.namespace,
        pod_uid=pod.uid,
        port_mappings=[
            PortMapping(p.host_port, p.container_port, p.protocol, p.host_ip)
            for p in pod.port_mappings
        ],
    )


class CniPodNetwork:
    def __init__(self, cni: Cni, run_dir: str) -> None:
        self._cni = cni
        self._run_dir = run_dir

    def netns_for(self, pod_id: str) -> str:
        return str(netns_path(self._run_dir, pod_id))

    async def attach(self, pod: PodRecord) -> Attachment:
        await create_netns(Path(pod.netns))
        net, result = await self._cni.add(network_request(pod))
        return Attachment(
            cni_network=_as_record(net),
            cni_result=result.raw,
            ips=tuple(result.ips),
        )

    async def detach(self, pod: PodRecord) -> None:
        # Nothing recorded: ADD may have run before criv could record it (criv died, or
        # the next step failed); DEL with today's list frees what ADD took.
        conf = pod.cni_network or _as_record(self._cni.network())
        await self._cni.delete(conf, pod.cni_result or None, network_request(pod))

    async def remove_netns(self, pod: PodRecord) -> None:
        if pod.netns:
            await delete_netns(Path(pod.netns))

    async def sweep(self, pods: list[PodRecord]) -> None:
        """Item by item: a netns that will not go is logged and left for the next start."""
        live = {p.netns for p in pods if p.netns}
        stale = [
            ns for ns in await asyncio.to_thread(list_netns, self._run_dir) if str(ns) not in live
        ]
        # a stopped pod's netns whose removal was cut short
        stale += [
            Path(p.netns)
            for p in pods
            if p.netns and p.state is PodState.NOTREADY and netns_exists(Path(p.netns))
        ]
        for ns in stale:
            log.warning("removing orphan netns %s", ns)
            try:
                await delete_netns(ns)
            except CrivError as e:
                log.error("cannot remove netns %s (left as it is): %s", ns, e)
