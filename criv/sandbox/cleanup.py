"""Taking a pod's parts down: the agent, the network, a container's files, a pod that
failed to come up. Shared by the pod, container and recovery services."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path

from criv.mounts import mounts_under
from criv.sandbox import imagevol
from criv.sandbox.cnidel import PendingDels
from criv.sandbox.context import SandboxContext
from criv.sandbox.logs import LogFollowers
from criv.sandbox.network import PodNetwork
from criv.sandbox.records import ContainerRecord, PodRecord
from criv.sandbox.rootfs import RootfsMounter, unmount_all_under
from criv.sandbox.scratch import PodScratch
from criv.sandbox.states import PodState
from criv.sandbox.watcher import AgentWatcher

log = logging.getLogger("criv.sandbox.cleanup")

AGENT_SHUTDOWN_TIMEOUT = 10


class PodCleanup:
    def __init__(
        self,
        ctx: SandboxContext,
        network: PodNetwork,
        logs: LogFollowers,
        rootfs: RootfsMounter,
        scratch: PodScratch,
        watcher: AgentWatcher,
    ) -> None:
        self._ctx = ctx
        self._network = network
        self._logs = logs
        self._rootfs = rootfs
        self._scratch = scratch
        self._watcher = watcher
        self.pending_dels = PendingDels(Path(ctx.config.state_dir), network, ctx.tasks)

    async def stop_agent(self, pod: PodRecord, graceful: bool) -> None:
        """Stop watching, following and talking to the pod's agent, then stop (or, not
        graceful, destroy) what runs it."""
        ctx = self._ctx
        await self._watcher.stop(pod.id)
        await self._logs.stop_pod(pod.id)
        rt = ctx.rt.get(pod.id)
        client = rt.client if rt is not None else None
        iso = ctx.isolations.get(pod.isolation)
        if iso is not None:
            paths = ctx.paths(pod.id)
            if graceful:
                await iso.stop(pod, paths, client, AGENT_SHUTDOWN_TIMEOUT)
            else:
                await iso.destroy(pod, paths)
        if rt is not None and rt.client is not None:
            await rt.client.close()
            rt.client = None

    async def release_network(self, pod: PodRecord) -> None:
        """CNI DEL (a failure raises: kubelet retries StopPodSandbox; ``network_ready``
        stays set until DEL succeeds), then the netns. A PENDING pod gets a DEL too: its
        ADD may have run without its result being recorded."""
        self.pending_dels.kick()  # earlier failed DELs get another try with each release
        if pod.host_network or not pod.netns:
            return
        if pod.network_ready or pod.state is PodState.PENDING:
            await self._network.detach(pod)
            await self._ctx.pods.update(
                pod.id, lambda r: dataclasses.replace(r, network_ready=False)
            )
        await self._network.remove_netns(pod)

    async def remove_container_files(self, c: ContainerRecord) -> None:
        """Everything of a container on the host, then its record and name."""
        ctx = self._ctx
        await self._logs.stop(c.sandbox_id, c.id)
        pod = ctx.pods.get(c.sandbox_id)
        iso = ctx.isolations.get(pod.isolation) if pod is not None else None
        if iso is not None:
            # a vm pod's binds of the rootfs keep the overlay busy: they go first
            await iso.unshare(ctx.paths(c.sandbox_id), c.id)
        cdir = await self.unmount_rootfs(c.sandbox_id, c.id)
        # Only now that the overlay is off may its layers go (if their image was removed).
        # Before the record: if this fails, RemoveContainer fails and is retried.
        await ctx.images.release_many(imagevol.holders_of(ctx.images.lease_holders(), c.id))
        await ctx.containers.delete(c.id, remove_dir=cdir)
        if pod is not None:
            ctx.container_names.release(c.reserved_name(pod), c.id)

    async def unmount_rootfs(self, pod_id: str, cid: str) -> Path:
        """Unmount and delete the container's image volumes, rootfs and writable layer,
        wherever that is (a pod's scratch filesystem may postdate its older containers);
        returns the container dir."""
        cdir = self._ctx.container_dir(pod_id, cid)
        await imagevol.unmount(cdir)
        writable = await self._scratch.locate(self._ctx.paths(pod_id).state, cid)
        await self._rootfs.unmount(cdir, writable or cdir)
        return cdir

    async def discard_pod(self, pod_id: str, reserved_name: str) -> None:
        """Undo whatever part of RunPodSandbox happened: agent, network, record, name."""
        ctx = self._ctx
        pod = ctx.pods.get(pod_id)
        if pod is not None:
            with contextlib.suppress(Exception):
                await self.stop_agent(pod, graceful=False)
            current = ctx.pods.get(pod_id) or pod
            try:
                await self.release_network(current)
            except Exception as e:
                # The record goes (kubelet retries under a new id), the DEL must not: a
                # lost DEL leaks the pod's IP for good. Kept with its netns, retried.
                await self.pending_dels.keep(current, getattr(e, "message", repr(e)))
            state = ctx.paths(pod_id).state
            with contextlib.suppress(Exception):
                await unmount_all_under(state)
            # rmtree would walk into a mount that would not come off (a volume's host
            # dir): the dir then stays for the start-up sweep, which checks again
            busy = await asyncio.to_thread(mounts_under, state)
            if busy:
                log.error("pod %s: keeping %s, still mounted: %s", pod_id[:12], state, busy[0])
            await ctx.pods.delete(pod_id, remove_dir=None if busy else state)
        ctx.rt.pop(pod_id, None)
        ctx.pod_names.release(reserved_name, pod_id)
