"""SandboxManager: the sandbox layer's one entry point for the CRI servicers.

It is the composition root: a :class:`SandboxContext` plus the services built over it
(pods, containers, recovery) and their collaborators (agent watcher, log followers,
cleanup), with the isolation modes, the pod network, the rootfs mounter and the pod
scratch filesystems injected.
:meth:`SandboxManager.create` wires the real ones; a unit test passes fakes to
:meth:`SandboxManager.__init__`.

``await start()`` runs recovery (re-adopting agents that outlived the previous criv);
``await close()`` stops criv's watchers, log followers and agent connections but
leaves pods running, so the next criv picks them up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from criv.agent.types import ExecResult
from criv.commands import configure_timeouts
from criv.config import Config
from criv.network.cni import Cni
from criv.sandbox.cleanup import PodCleanup
from criv.sandbox.containers import ContainerService
from criv.sandbox.context import ImageSource, SandboxContext
from criv.sandbox.isolation import Isolation, PodPaths
from criv.sandbox.logs import LogFollowers
from criv.sandbox.modes import build_isolations
from criv.sandbox.network import CniPodNetwork, PodNetwork
from criv.sandbox.pods import PodService
from criv.sandbox.records import ContainerRecord, PodRecord
from criv.sandbox.recovery import RecoveryService
from criv.sandbox.rootfs import OverlayRootfs, RootfsMounter
from criv.sandbox.scratch import LoopScratch, PodScratch
from criv.sandbox.specs import ContainerFilter, ContainerSpec, PodFilter, PodSpec
from criv.sandbox.stats import ContainerSample
from criv.sandbox.watcher import AgentWatcher
from criv.state.runtime_state import RuntimeState


class SandboxManager:
    def __init__(
        self,
        config: Config,
        images: ImageSource,
        runtime_state: RuntimeState,
        isolations: Mapping[str, Isolation],
        network: PodNetwork,
        rootfs: RootfsMounter,
        scratch: PodScratch,
    ) -> None:
        ctx = SandboxContext(config, images, runtime_state, isolations)
        self.ctx = ctx
        self.logs = LogFollowers(ctx)
        self.watcher = AgentWatcher(ctx)
        self.cleanup = PodCleanup(ctx, network, self.logs, rootfs, scratch, self.watcher)
        self.pod_service = PodService(ctx, network, self.cleanup, self.watcher, self.logs)
        self.container_service = ContainerService(ctx, self.cleanup, self.logs, rootfs, scratch)
        self.recovery = RecoveryService(ctx, network, self.cleanup, self.watcher, self.logs)
        # what the CRI servicers read directly
        self.pods = ctx.pods
        self.containers = ctx.containers
        self.bus = ctx.bus

    @classmethod
    def create(
        cls, config: Config, images: ImageSource, runtime_state: RuntimeState
    ) -> SandboxManager:
        """The manager with criv's real isolation modes, CNI networking, overlays and
        per-pod scratch filesystems."""
        configure_timeouts(config.timeouts.commands)  # every host command's deadline
        return cls(
            config,
            images,
            runtime_state,
            build_isolations(config, runtime_state),
            CniPodNetwork(Cni(config.cni), config.run_dir),
            OverlayRootfs(),
            LoopScratch(config.runtime.pod_scratch_limit_mib),
        )

    async def start(self) -> None:
        await self.recovery.recover()
        self.ctx.runtime_state.publish(
            "isolation_modes", sorted(set(self.ctx.config.runtime.handlers.values()))
        )

    def end_event_streams(self) -> None:
        """End GetContainerEvents streams, so a stopping server need not wait them out."""
        self.ctx.bus.close()

    async def close(self) -> None:
        ctx = self.ctx
        ctx.bus.close()
        for pod_id, rt in list(ctx.rt.items()):
            if rt.watcher is not None:
                rt.watcher.cancel()
            await self.logs.stop_pod(pod_id)
            if rt.client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(rt.client.close(), 5.0)
                rt.client = None
        await ctx.tasks.cancel_all()
        for iso in ctx.isolations.values():
            with contextlib.suppress(Exception):
                await iso.close()

    # -- the CRI's view: pods ------------------------------------------------------------

    def paths(self, pod_id: str) -> PodPaths:
        return self.ctx.paths(pod_id)

    def pod(self, pod_id: str) -> PodRecord:
        return self.ctx.pod(pod_id)

    def container(self, cid: str) -> ContainerRecord:
        return self.ctx.container(cid)

    def containers_of(self, pod_id: str) -> list[ContainerRecord]:
        return self.ctx.containers_of(pod_id)

    async def run_pod(self, spec: PodSpec) -> str:
        return await self.pod_service.run(spec)

    async def stop_pod(self, pod_id: str) -> None:
        await self.pod_service.stop(pod_id)

    async def remove_pod(self, pod_id: str) -> None:
        await self.pod_service.remove(pod_id)

    def pod_status(self, pod_id: str) -> PodRecord:
        return self.pod_service.status(pod_id)

    def list_pods(self, f: PodFilter) -> list[PodRecord]:
        return self.pod_service.matching(f)

    # -- containers ----------------------------------------------------------------------

    async def create_container(self, pod_id: str, spec: ContainerSpec) -> str:
        return await self.container_service.create(pod_id, spec)

    async def start_container(self, cid: str) -> None:
        await self.container_service.start(cid)

    async def stop_container(self, cid: str, timeout: int) -> None:
        await self.container_service.stop(cid, timeout)

    async def remove_container(self, cid: str) -> None:
        await self.container_service.remove(cid)

    async def container_status(self, cid: str) -> ContainerRecord:
        return await self.container_service.status(cid)

    def list_containers(self, f: ContainerFilter) -> list[ContainerRecord]:
        return self.container_service.matching(f)

    async def exec_sync(self, cid: str, cmd: list[str], timeout: int) -> ExecResult:
        return await self.container_service.exec_sync(cid, cmd, timeout)

    async def update_resources(self, cid: str, linux: bytes) -> None:
        await self.container_service.update_resources(cid, linux)

    async def reopen_log(self, cid: str) -> None:
        await self.container_service.reopen_log(cid)

    async def container_stats(self, cids: list[str]) -> dict[str, ContainerSample]:
        return await self.container_service.stats(cids)
