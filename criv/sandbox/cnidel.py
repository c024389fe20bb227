"""CNI DELs that failed after their pod's record went: kept and retried until they pass.

When a RunPodSandbox that already ran CNI ADD is undone (it failed, or criv died inside
it) and DEL fails, the pod's record is still deleted (kubelet retries RunPodSandbox under
a new id), but without DEL the IPAM address, the veth and the masquerade rules stay taken
for good. So what DEL needs (pod id, netns path, interface, the network list as at ADD
time, ADD's result, CNI_ARGS, port mappings) goes into a small versioned record,
``<state_dir>/cni-pending/<pod id>.json``, and its netns is kept, so the retry runs DEL as
the first try would have. Retried at every start of criv and whenever a pod's network is
released (StopPodSandbox, RemovePodSandbox), until it succeeds; `criv doctor` lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from criv.errors import CrivError
from criv.network.cni import IFNAME
from criv.sandbox.network import PodNetwork
from criv.sandbox.records import PodRecord, PortMap
from criv.sandbox.states import PodState
from criv.sandbox.tasks import BackgroundTasks
from criv.state.records import read_record, write_record

log = logging.getLogger("criv.sandbox.cnidel")

DIR_NAME = "cni-pending"
KIND = "cni-del"
VERSION = 1


@dataclass(frozen=True)
class PendingDel:
    pod_id: str
    name: str
    namespace: str
    uid: str
    netns: str
    ifname: str
    network_name: str
    cni_network: dict[str, Any]  # the list as at ADD time ({}: ADD's was never recorded)
    cni_result: dict[str, Any]
    port_mappings: tuple[PortMap, ...] = ()
    since_ns: int = 0
    attempts: int = 1
    last_error: str = ""

    @classmethod
    def of(cls, pod: PodRecord, error: str) -> PendingDel:
        return cls(
            pod_id=pod.id, name=pod.name, namespace=pod.namespace, uid=pod.uid,
            netns=pod.netns, ifname=IFNAME, network_name=str(pod.cni_network.get("name", "")),
            cni_network=dict(pod.cni_network), cni_result=dict(pod.cni_result),
            port_mappings=pod.port_mappings, since_ns=time.time_ns(), last_error=error,
        )  # fmt: skip

    def as_pod(self) -> PodRecord:
        """A stand-in record carrying just what DEL reads (and what the netns sweep keeps:
        a PENDING pod's netns)."""
        return PodRecord(
            id=self.pod_id, name=self.name, namespace=self.namespace, uid=self.uid,
            attempt=0, state=PodState.PENDING, created_at_ns=self.since_ns, handler="",
            isolation="", config=b"", netns=self.netns, port_mappings=self.port_mappings,
            cni_network=self.cni_network, cni_result=self.cni_result, network_ready=True,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PendingDel:
        d = dict(d)
        d["port_mappings"] = tuple(PortMap(**p) for p in d.get("port_mappings", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def pending_dir(state_dir: Path) -> Path:
    return state_dir / DIR_NAME


def list_pending(state_dir: Path) -> list[PendingDel]:
    """The pending DELs on disk (blocking); an unreadable file is logged and left."""
    d = pending_dir(state_dir)
    out: list[PendingDel] = []
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            _, data = read_record(p, KIND, VERSION)
            out.append(PendingDel.from_dict(data))
        except (CrivError, TypeError, ValueError) as e:
            log.error("pending CNI DEL %s is unreadable (left as it is): %s", p, e)
    return out


@dataclass
class PendingDels:
    """Keeps and retries failed DELs. One retry pass at a time."""

    state_dir: Path
    network: PodNetwork
    tasks: BackgroundTasks
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def _path(self, pod_id: str) -> Path:
        return pending_dir(self.state_dir) / f"{pod_id}.json"

    async def keep(self, pod: PodRecord, error: str) -> None:
        p = PendingDel.of(pod, error)
        await asyncio.to_thread(write_record, self._path(pod.id), KIND, VERSION, p.to_dict())
        log.error(
            "pod %s: CNI DEL failed (%s); kept in %s and retried until it succeeds",
            pod.id[:12], error, self._path(pod.id),
        )  # fmt: skip

    async def all(self) -> list[PendingDel]:
        return await asyncio.to_thread(list_pending, self.state_dir)

    def kick(self) -> None:
        """Retry in the background unless a pass is already running."""
        if not self._lock.locked() and any(pending_dir(self.state_dir).glob("*.json")):
            self.tasks.spawn(self.retry(), "cni-del-retry")

    async def retry(self) -> int:
        """One pass over every pending DEL; returns how many are still pending."""
        async with self._lock:
            left = 0
            for p in await self.all():
                if not await self._retry_one(p):
                    left += 1
            return left

    async def _retry_one(self, p: PendingDel) -> bool:
        stand_in = p.as_pod()
        try:
            await self.network.detach(stand_in)
            await self.network.remove_netns(stand_in)
        except CrivError as e:
            again = dataclasses.replace(p, attempts=p.attempts + 1, last_error=e.message)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(
                    write_record, self._path(p.pod_id), KIND, VERSION, again.to_dict()
                )
            log.warning("pod %s: CNI DEL still failing (try %d): %s",
                        p.pod_id[:12], again.attempts, e.message)  # fmt: skip
            return False
        await asyncio.to_thread(self._path(p.pod_id).unlink, True)
        log.info("pod %s: pending CNI DEL done after %d failed tries", p.pod_id[:12], p.attempts)
        return True
