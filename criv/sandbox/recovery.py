"""Recovery at criv start: reload records, re-adopt live agents, collect the rest.

Agents (host processes, VMs) outlive criv. At start criv:

1. loads every pod and container record (an unreadable one is logged and its
   directory treated as an orphan);
2. per pod: a PENDING pod (criv died inside RunPodSandbox) is torn down; a READY pod
   whose agent is alive is reconnected, its containers refreshed from the agent, the
   event watcher and log followers resumed from their persisted offsets; a READY pod
   whose agent is gone becomes NOTREADY, its unfinished containers EXITED with reason
   ``AgentGone``, and its network is released; a NOTREADY pod gets any leftover
   agent killed and network released;
3. sweeps what no record owns: netns files, mounts under the state dir, pod dirs and
   socket dirs; each isolation mode sweeps its own (host: criv-agent processes started
   for this run dir; vm: libvirt domains tagged with this state dir, vsock backends
   under this run dir, taps left in the host netns);
4. settles image leases (after the sweep, so no orphan overlay is still mounted): a
   lease whose container record is gone is released and its layers collected; a
   container without one (made before leases existed) gets one if its image is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import time
from pathlib import Path

from criv import metrics
from criv.errors import CrivError, ImageNotFound
from criv.mounts import mounts_under
from criv.sandbox.cleanup import PodCleanup
from criv.sandbox.context import SandboxContext
from criv.sandbox.logs import LogFollowers
from criv.sandbox.network import PodNetwork
from criv.sandbox.records import PodRecord
from criv.sandbox.rootfs import umount_lazy
from criv.sandbox.states import ContainerState, PodState
from criv.sandbox.transitions import apply_info, set_state
from criv.sandbox.watcher import AgentWatcher

log = logging.getLogger("criv.sandbox.recovery")

RECONNECT_TIMEOUT = 10.0


class RecoveryService:
    def __init__(
        self,
        ctx: SandboxContext,
        network: PodNetwork,
        cleanup: PodCleanup,
        watcher: AgentWatcher,
        logs: LogFollowers,
    ) -> None:
        self._ctx = ctx
        self._network = network
        self._cleanup = cleanup
        self._watcher = watcher
        self._logs = logs

    async def recover(self) -> None:
        ctx = self._ctx
        orphan_dirs = await asyncio.to_thread(self._load_records)
        for pod in ctx.pods.all():
            ctx.pod_names.reserve(pod.reserved_name, pod.id)
        for c in ctx.containers.all():
            if (owner := ctx.pods.get(c.sandbox_id)) is not None:
                ctx.container_names.reserve(c.reserved_name(owner), c.id)
        for pod in ctx.pods.all():
            try:
                await self._recover_pod(pod)
            except Exception:
                log.exception("recovering pod %s failed", pod.id[:12])
        await self._sweep(orphan_dirs)
        try:
            await self._settle_image_leases()
        except (CrivError, OSError) as e:
            log.error("settling image leases failed: %s", e)
        log.info(
            "recovered %d pod sandboxes, %d containers",
            len(ctx.pods.all()),
            len(ctx.containers.all()),
        )

    def _load_records(self) -> list[Path]:
        ctx = self._ctx
        orphans: list[Path] = []
        if not ctx.state_root.is_dir():
            return orphans
        for d in sorted(ctx.state_root.iterdir()):
            try:
                pod = ctx.pods.load(d / "sandbox.json")
            except CrivError as e:
                log.error("pod dir %s: %s; removing it", d, e)
                orphans.append(d)
                continue
            cdir = ctx.paths(pod.id).containers
            if not cdir.is_dir():
                continue
            for c in sorted(cdir.iterdir()):
                try:
                    ctx.containers.load(c / "container.json")
                except CrivError as e:
                    log.error("container dir %s: %s; removing it", c, e)
                    orphans.append(c)
        return orphans

    async def _recover_pod(self, pod: PodRecord) -> None:
        ctx = self._ctx
        iso = ctx.isolations.get(pod.isolation)
        if pod.state is PodState.PENDING:
            log.warning("pod %s was being created when criv stopped: removing", pod.id[:12])
            for c in ctx.containers_of(pod.id):
                await self._cleanup.remove_container_files(c)
            await self._cleanup.discard_pod(pod.id, pod.reserved_name)
            return
        if pod.state is PodState.READY and iso is not None and await iso.alive(pod):
            try:
                client = await iso.connect(pod, ctx.paths(pod.id), RECONNECT_TIMEOUT)
            except CrivError as e:
                log.error("pod %s: agent alive but not answering: %s", pod.id[:12], e)
            else:
                ctx.runtime(pod.id).client = client
                await self._refresh_containers(pod)
                self._watcher.start(pod.id)
                for c in ctx.containers_of(pod.id):
                    if c.started_at_ns:
                        self._logs.start(pod, c)
                return
        # No usable agent: whatever ran is over.
        if pod.state is PodState.READY:
            log.error("pod %s: agent gone while criv was down", pod.id[:12])
        await self._mark_containers_gone(pod)
        await self._cleanup.stop_agent(pod, graceful=False)
        try:
            await self._cleanup.release_network(ctx.pods.must(pod.id))
        except CrivError as e:
            log.error("pod %s: network teardown failed: %s", pod.id[:12], e)
        if pod.state is not PodState.NOTREADY:
            await ctx.pods.update(pod.id, lambda r: dataclasses.replace(r, state=PodState.NOTREADY))

    async def _refresh_containers(self, pod: PodRecord) -> None:
        ctx = self._ctx
        client = ctx.client_of(pod.id)
        assert client is not None
        known = {i.container_id: i for i in await client.list_containers()}
        for c in ctx.containers_of(pod.id):
            info = known.get(c.id)
            if info is not None:
                await apply_info(ctx, c.id, info)
            elif c.state is not ContainerState.EXITED:
                await set_state(
                    ctx, c.id, ContainerState.EXITED, exit_code=255, reason="Unknown",
                    message="the agent no longer knows this container",
                    finished_at_ns=time.time_ns(),
                )  # fmt: skip

    async def _mark_containers_gone(self, pod: PodRecord) -> None:
        for c in self._ctx.containers_of(pod.id):
            if c.state is not ContainerState.EXITED:
                await set_state(
                    self._ctx, c.id, ContainerState.EXITED, exit_code=255, reason="AgentGone",
                    message="the pod's agent was gone when criv restarted",
                    finished_at_ns=time.time_ns(),
                )  # fmt: skip

    async def _settle_image_leases(self) -> None:
        ctx = self._ctx
        known = {c.id for c in ctx.containers.all()}
        leased = ctx.images.lease_holders()
        stale = leased - known
        if stale:
            log.warning("releasing image leases of %d removed container(s)", len(stale))
            await ctx.images.release_many(stale)  # collects what they alone kept
        for c in ctx.containers.all():
            if c.id not in leased:
                with contextlib.suppress(ImageNotFound):
                    await ctx.images.acquire(c.image_id, c.id)

    # -- the orphan sweep ----------------------------------------------------------

    async def _sweep(self, orphan_dirs: list[Path]) -> None:
        ctx = self._ctx
        pods = ctx.pods.all()
        with metrics.sweep("network"):
            await self._network.sweep(pods)
        for iso in ctx.isolations.values():
            try:
                with metrics.sweep(iso.mode):
                    await iso.sweep(pods)
            except CrivError as e:
                log.error("%s isolation sweep failed: %s", iso.mode, e)
        known_pods = {p.id for p in pods}
        known_containers = {c.id for c in ctx.containers.all()}
        for m in await asyncio.to_thread(mounts_under, ctx.state_root):
            parts = m.relative_to(ctx.state_root).parts
            if parts[0] in known_pods and not (
                len(parts) >= 3 and parts[1] == "containers" and parts[2] not in known_containers
            ):
                continue  # a live pod's mount (container rootfs, agent's own)
            log.warning("unmounting orphan mount %s", m)
            await umount_lazy(m)
            metrics.SWEPT.labels(kind="mount").inc()
        for d in orphan_dirs:
            await asyncio.to_thread(shutil.rmtree, d, True)
        metrics.SWEPT.labels(kind="unreadable_record").inc(len(orphan_dirs))
        short = {p.id[:12] for p in pods}
        n = await asyncio.to_thread(_remove_unknown_dirs, ctx.state_root, known_pods)
        n += await asyncio.to_thread(_remove_unknown_dirs, ctx.run_root, short)
        metrics.SWEPT.labels(kind="pod_dir").inc(n)


def _remove_unknown_dirs(root: Path, known: set[str]) -> int:
    removed = 0
    if root.is_dir():
        for d in list(root.iterdir()):
            if d.name not in known:
                shutil.rmtree(d, True)
                removed += 1
    return removed
