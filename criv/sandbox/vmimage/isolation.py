"""``vm-image`` isolation: the pod's container image carries a bootable disk (KubeVirt's
containerDisk layout) that boots as the pod's VM; docs/vm-images.md.

RunPodSandbox makes the netns and runs CNI as for any pod, and starts the pod's
in-process agent (:class:`.agent.VmImageAgent`) with its data endpoint
(:class:`criv.agent.hostdata.HostDataServer` on the pod's ``d.sock``): no VM yet.
CreateContainer's :meth:`check_image` finds the disk in the image's layers
(:func:`criv.vmimage.containerdisk.find_disk`, INVALID_ARGUMENT naming why) and refuses
a second container; StartContainer boots it (:mod:`.machine`).

A criv restart: the VM is a libvirt domain and outlives criv; what the agent knew is in
the pod's agent record (:mod:`.record`). :meth:`close` lets go of each pod (its VM runs
on); the next criv's recovery calls :meth:`alive` (true for a pod it has not seen go)
and :meth:`connect`, which reads the record and takes the pod back
(:mod:`.adopt`), or raises where the record is missing or cannot be trusted, so
recovery destroys the VM and marks the pod NOTREADY.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from criv.agent.client import AgentClient
from criv.agent.hostdata import HostDataServer
from criv.agent.types import GuestIdentity, GuestNetwork
from criv.config import Config
from criv.errors import AgentError, CrivError, FailedPrecondition, InvalidArgument
from criv.hypervisor.spec import domain_name
from criv.sandbox.isolation import PodPaths
from criv.sandbox.isostate import IsolationState, VmImageState
from criv.sandbox.records import MountRecord, PodRecord
from criv.sandbox.vm.host import VmHost
from criv.sandbox.vmimage import machine, record
from criv.vmimage.containerdisk import find_disk

if TYPE_CHECKING:
    # imported when a vm-image pod first runs: the SSH layer (paramiko) costs criv ~17 MiB
    # of memory that a node without vm-image pods need not pay
    from criv.sandbox.vmimage.agent import VmImageAgent
    from criv.sandbox.vmimage.container import VmContainer

log = logging.getLogger("criv.sandbox.vmimage")


class VmImageIsolation:
    mode = "vm-image"
    # the VM is the container, not the agent: a VM that stops is a container that exited
    containers_die_with_agent = False

    def __init__(self, config: Config, host: VmHost) -> None:
        self._config = config
        owner = str(Path(config.state_dir).resolve())
        self._root = Path(config.state_dir) / "vmimage"
        self._host = host
        self._vms = machine.Machines(config, self._host, owner)
        self._agents: dict[str, VmImageAgent] = {}
        self._servers: dict[str, HostDataServer] = {}
        self._seen: set[str] = set()  # pods this criv served (so: not alive once gone)

    async def prepare(self, pod: PodRecord, paths: PodPaths) -> None:
        if pod.host_network:
            raise InvalidArgument(
                "a vm-image pod cannot use the host network; its VM takes the pod's IP"
            )

    async def boot(self, pod: PodRecord, paths: PodPaths) -> IsolationState:
        if pod.id not in self._agents:
            agent = await self._new_agent(pod, paths)
            await agent.keeper.save()  # the record a restarted criv takes the pod back by
            await self._serve(pod, paths, agent)
        return VmImageState(domain=domain_name(pod.id))

    async def _new_agent(self, pod: PodRecord, paths: PodPaths) -> VmImageAgent:
        from criv.sandbox.vmimage.agent import VmImageAgent  # late: see the imports above

        for d in (paths.run, paths.state, paths.state / "vmimage"):
            await asyncio.to_thread(d.mkdir, parents=True, exist_ok=True, mode=0o700)
        wait = float(self._config.vm.image_ssh_wait_seconds)
        return VmImageAgent(pod, paths.state, self._root, self._vms, wait)

    async def _serve(self, pod: PodRecord, paths: PodPaths, agent: VmImageAgent) -> None:
        server = HostDataServer(paths.data_socket, agent)
        await server.start()
        self._agents[pod.id] = agent
        self._servers[pod.id] = server
        self._seen.add(pod.id)

    async def connect(self, pod: PodRecord, paths: PodPaths, timeout: float) -> AgentClient:
        agent = self._agents.get(pod.id)
        if agent is None:
            agent = await self._adopt(pod, paths)
        return agent

    async def _adopt(self, pod: PodRecord, paths: PodPaths) -> VmImageAgent:
        """After a criv restart: the pod's agent again, from its record (:mod:`.adopt`).
        A record that is missing or cannot be trusted is AgentError (never anything
        else): recovery then destroys the VM and marks the pod NOTREADY."""
        try:
            rec = await asyncio.to_thread(record.read, record.record_path(paths.state), pod.id)
            agent = await self._new_agent(pod, paths)
            plan = await agent.adopt(rec, self._vms.domain_owner)
            await self._serve(pod, paths, agent)
        except Exception as e:
            why = e.message if isinstance(e, CrivError) else f"{type(e).__name__}: {e}"
            log.error("vm-image pod %s not taken back: %s", pod.id[:12], why)
            raise AgentError(f"vm-image pod {pod.id[:12]} not taken back: {why}") from e
        box = agent.keeper.box
        log.info(
            "vm-image pod %s taken back (%s%s)", pod.id[:12], plan.value,
            f": container {box.cid[:12]} {box.state.value}" if box is not None else "",
        )  # fmt: skip
        return agent

    async def alive(self, pod: PodRecord) -> bool:
        """Served here, or not seen go by this criv (then :meth:`connect` tells)."""
        return pod.id in self._agents or pod.id not in self._seen

    async def check_image(
        self, pod: PodRecord, paths: PodPaths, cid: str, image_id: str, layer_dirs: list[Path]
    ) -> None:
        agent = self._agents.get(pod.id)
        if agent is None:
            raise AgentError(f"vm-image pod {pod.id[:12]} has no agent")
        try:
            disk = await asyncio.to_thread(find_disk, layer_dirs)
        except InvalidArgument as e:
            raise InvalidArgument(
                f"a vm-image pod's container image must be a containerDisk: {e}"
            ) from None
        base = await asyncio.to_thread(machine.link_base, self._root, disk, image_id)
        agent.reserve(cid, base)

    def commit_source(self, pod: PodRecord, cid: str) -> VmContainer:
        """The stopped container of ``pod`` whose disk `criv vm-image commit` flattens."""
        agent = self._agents.get(pod.id)
        if agent is None:
            raise FailedPrecondition(
                f"vm-image pod {pod.id[:12]} is not served (stopped, or not taken back after "
                "a criv restart): its container's disk is gone"
            )
        return agent.commit_source(cid)

    async def stop(
        self, pod: PodRecord, paths: PodPaths, client: AgentClient | None, timeout: int
    ) -> None:
        agent = self._agents.get(pod.id)
        if agent is not None:
            try:
                await agent.shutdown(timeout)
            except CrivError as e:
                log.warning("pod %s: VM shutdown failed: %s", pod.id[:12], e)
        await self.destroy(pod, paths)

    async def forget(self, pod: PodRecord, paths: PodPaths) -> None:
        pass  # no spare VMs here: destroy and the containers' removal clean up

    async def destroy(self, pod: PodRecord, paths: PodPaths) -> None:
        with contextlib.suppress(CrivError):
            await self._vms.destroy(pod)
        agent = self._agents.pop(pod.id, None)
        if agent is not None:
            agent.end_events()
            await agent.keeper.drop()
        self._seen.add(pod.id)
        server = self._servers.pop(pod.id, None)
        if server is not None:
            await server.close()

        def clean() -> None:
            record.remove(record.record_path(paths.state))
            shutil.rmtree(machine.pod_dir(self._root, pod.id), ignore_errors=True)
            with contextlib.suppress(OSError):
                paths.run.rmdir()
            for base in machine.prune_bases(self._root):
                log.info("removed base disk %s: its image is gone and no pod uses it", base)

        await asyncio.to_thread(clean)
        self._host.stops.pop(domain_name(pod.id), None)

    def agent_path(self, paths: PodPaths, host_path: Path) -> str:
        return str(host_path)

    def data_endpoint(self, paths: PodPaths) -> str:
        return str(paths.data_socket)

    async def share(self, paths: PodPaths, cid: str, mount: MountRecord, name: str) -> str:
        return mount.host_path  # nothing reaches the VM but its disks (volumes: not built)

    def pod_files_dir(self, paths: PodPaths) -> str:
        return str(paths.shared)

    async def unshare(self, paths: PodPaths, cid: str) -> None:
        pass

    def guest_network(self, pod: PodRecord) -> GuestNetwork | None:
        return None  # the NoCloud seed carries it, per container

    def guest_identity(self, pod: PodRecord) -> GuestIdentity | None:
        return None  # no criv agent in the guest: each container VM boots cold

    async def sweep(self, pods: list[PodRecord]) -> None:
        """Domains of vm-image pods this criv does not serve (no pod, or a pod that was
        not taken back after a restart) are destroyed."""
        if self.mode not in self._config.runtime.handlers.values():
            return  # not configured: no libvirt connection for it
        live = {domain_name(p.id) for p in pods if p.id in self._agents}
        owner = self._vms.domain_owner
        try:
            hv = await self._host.hypervisor()
            domains = await hv.list_domains()
        except CrivError as e:
            log.warning("cannot list libvirt domains (%s); skipping the vm-image sweep", e)
            return
        for d in domains:
            if d.owner == owner and d.name not in live:
                log.warning("destroying orphan vm-image domain %s", d.name)
                with contextlib.suppress(CrivError):
                    await hv.destroy(d.name)
        for base in await asyncio.to_thread(machine.prune_bases, self._root):
            log.info("removed base disk %s: its image is gone and no pod uses it", base)

    async def close(self) -> None:
        """criv stops: each pod is let go of (its VM runs on, its record says where its
        console's copy stopped), then its data socket closes."""
        for pod_id, agent in list(self._agents.items()):
            try:
                await agent.suspend()
            except Exception:  # the next criv repeats more of the console, nothing worse
                log.exception("vm-image pod %s: letting go of it failed", pod_id[:12])
        for server in list(self._servers.values()):
            await server.close()
        self._servers.clear()  # the VmHost is the vm mode's to close
