"""Recovery at criv start: reload records, re-adopt live agents, collect the rest.

Agents (host processes here, VMs later) outlive criv. At start criv:

1. loads every pod and container record (an unreadable one is logged and its
   directory treated as an orphan);
2. per pod: a PENDING pod (criv died inside RunPodSandbox) is torn down; a READY pod
   whose agent is alive is reconnected, its containers refreshed from the agent, the
   event watcher and log followers resumed from their persisted offsets; a READY pod
   whose agent is gone becomes NOTREADY, its unfinished containers EXITED with reason
   ``AgentGone``, and its network is released; a NOTREADY pod gets any leftover
   agent killed and network released;
3. sweeps what no record owns: netns files, mounts under the state dir, pod dirs,
   socket dirs and criv-agent processes started for this run dir; each isolation mode
   sweeps its own (vm: libvirt domains tagged with this state dir, vsock backends under
   this run dir, taps left in the host netns);
4. settles image leases (after the sweep, so no orphan overlay is still mounted): a
   lease whose container record is gone is released and its layers collected; a
   container without one (made before leases existed) gets one if its image is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from criv.errors import CrivError, ImageNotFound
from criv.mounts import mounts_under
from criv.network.netns import delete_netns, list_netns, netns_exists
from criv.sandbox.containers import ContainerOps
from criv.sandbox.records import ContainerRecord, PodRecord
from criv.sandbox.rootfs import umount_lazy
from criv.sandbox.states import ContainerState, PodState

log = logging.getLogger("criv.sandbox.recovery")

RECONNECT_TIMEOUT = 10.0


class RecoveryOps(ContainerOps):
    async def recover(self) -> None:
        orphan_dirs = await asyncio.to_thread(self._load_records)
        for pod in self.pods.all():
            self.pod_names.reserve(f"{pod.name}_{pod.namespace}_{pod.uid}_{pod.attempt}", pod.id)
        for c in self.containers.all():
            self.container_names.reserve(self.container_name_of(c), c.id)
        for pod in self.pods.all():
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
            len(self.pods.all()),
            len(self.containers.all()),
        )

    def _load_records(self) -> list[Path]:
        orphans: list[Path] = []
        if not self.state_root.is_dir():
            return orphans
        for d in sorted(self.state_root.iterdir()):
            try:
                pod = self.pods.load(d / "sandbox.json")
            except CrivError as e:
                log.error("pod dir %s: %s; removing it", d, e)
                orphans.append(d)
                continue
            cdir = self.paths(pod.id).containers
            if not cdir.is_dir():
                continue
            for c in sorted(cdir.iterdir()):
                try:
                    self.containers.load(c / "container.json")
                except CrivError as e:
                    log.error("container dir %s: %s; removing it", c, e)
                    orphans.append(c)
        return orphans

    async def _recover_pod(self, pod: PodRecord) -> None:
        iso = self.isolations.get(pod.isolation)
        if pod.state is PodState.PENDING:
            log.warning("pod %s was being created when criv stopped: removing", pod.id[:12])
            for c in self.containers_of(pod.id):
                await self._remove_container_files(c)
            await self._teardown_failed(
                pod.id, f"{pod.name}_{pod.namespace}_{pod.uid}_{pod.attempt}"
            )
            return
        if pod.state is PodState.READY and iso is not None and iso.alive(pod):
            try:
                client = await iso.connect(pod, self.paths(pod.id), RECONNECT_TIMEOUT)
            except CrivError as e:
                log.error("pod %s: agent alive but not answering: %s", pod.id[:12], e)
            else:
                self.rt[pod.id].client = client
                await self._refresh_containers(pod)
                self.start_watcher(pod.id)
                for c in self.containers_of(pod.id):
                    if c.started_at_ns:
                        self.start_follower(pod, c)
                return
        # No usable agent: whatever ran is over.
        if pod.state is PodState.READY:
            log.error("pod %s: agent gone while criv was down", pod.id[:12])
        await self._mark_containers_gone(pod)
        await self._stop_agent(pod, graceful=False)
        try:
            await self._teardown_network(self.pods.must(pod.id, "pod sandbox"))
        except CrivError as e:
            log.error("pod %s: network teardown failed: %s", pod.id[:12], e)
        if pod.state is not PodState.NOTREADY:
            await self.pods.update(
                pod.id, lambda r: dataclasses.replace(r, state=PodState.NOTREADY)
            )

    async def _refresh_containers(self, pod: PodRecord) -> None:
        client = self.client_of(pod.id)
        assert client is not None
        known = {i.container_id: i for i in await client.list_containers()}
        for c in self.containers_of(pod.id):
            info = known.get(c.id)
            if info is not None:
                await self.apply_info(c.id, info)
            elif c.state is not ContainerState.EXITED:
                await self.set_state(
                    c.id, ContainerState.EXITED, exit_code=255, reason="Unknown",
                    message="the agent no longer knows this container",
                    finished_at_ns=time.time_ns(),
                )  # fmt: skip

    async def _mark_containers_gone(self, pod: PodRecord) -> None:
        for c in self.containers_of(pod.id):
            if c.state is not ContainerState.EXITED:
                await self.set_state(
                    c.id, ContainerState.EXITED, exit_code=255, reason="AgentGone",
                    message="the pod's agent was gone when criv restarted",
                    finished_at_ns=time.time_ns(),
                )  # fmt: skip

    async def _settle_image_leases(self) -> None:
        known = {c.id for c in self.containers.all()}
        leased = self.images.lease_holders()
        stale = leased - known
        if stale:
            log.warning("releasing image leases of %d removed container(s)", len(stale))
            await self.images.release_many(stale)  # collects what they alone kept
        for c in self.containers.all():
            if c.id not in leased:
                with contextlib.suppress(ImageNotFound):
                    await self.images.acquire(c.image_id, c.id)

    # -- the orphan sweep ----------------------------------------------------------

    async def _sweep(self, orphan_dirs: list[Path]) -> None:
        pods = self.pods.all()
        live_netns = {p.netns for p in pods if p.netns}
        for ns in await asyncio.to_thread(list_netns, self.config.run_dir):
            if str(ns) not in live_netns:
                log.warning("removing orphan netns %s", ns)
                await delete_netns(ns)
        for p in pods:
            if p.netns and p.state is PodState.NOTREADY and netns_exists(Path(p.netns)):
                await delete_netns(Path(p.netns))
        await self._kill_orphan_agents(pods)
        for iso in self.isolations.values():
            try:
                await iso.sweep(pods)
            except CrivError as e:
                log.error("%s isolation sweep failed: %s", iso.mode, e)
        known_pods = {p.id for p in pods}
        known_containers = {c.id for c in self.containers.all()}
        for m in await asyncio.to_thread(mounts_under, self.state_root):
            parts = m.relative_to(self.state_root).parts
            if parts[0] in known_pods and not (
                len(parts) >= 3 and parts[1] == "containers" and parts[2] not in known_containers
            ):
                continue  # a live pod's mount (container rootfs, agent's own)
            log.warning("unmounting orphan mount %s", m)
            await umount_lazy(m)
        for d in orphan_dirs:
            await asyncio.to_thread(shutil.rmtree, d, True)
        if self.state_root.is_dir():
            for d in await asyncio.to_thread(lambda: list(self.state_root.iterdir())):
                if d.name not in known_pods:
                    await asyncio.to_thread(shutil.rmtree, d, True)
        short = {p.id[:12] for p in pods}
        if self.run_root.is_dir():
            for d in await asyncio.to_thread(lambda: list(self.run_root.iterdir())):
                if d.name not in short:
                    await asyncio.to_thread(shutil.rmtree, d, True)

    async def _kill_orphan_agents(self, pods: list[PodRecord]) -> None:
        """criv-agent processes serving sockets in our run dir that no pod owns."""
        owned = {int(p.isolation_state.get("pid", 0)) for p in pods if p.state is PodState.READY}
        marker = f"unix:{self.run_root}/".encode()

        def scan() -> list[int]:
            found = []
            for d in Path("/proc").iterdir():
                if not d.name.isdigit() or int(d.name) in owned:
                    continue
                with contextlib.suppress(OSError):
                    cmd = (d / "cmdline").read_bytes()
                    if b"criv-agent" in cmd and marker in cmd:
                        found.append(int(d.name))
            return found

        for pid in await asyncio.to_thread(scan):
            log.warning("killing orphan agent pid %d", pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


__all__ = ["ContainerRecord", "RecoveryOps"]
