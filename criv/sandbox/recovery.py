"""Recovery at criv start: reload records, re-adopt live agents, collect the rest.

Agents (host processes, VMs) outlive criv. At start criv:

1. loads every pod and container record; one that exists but cannot be read is
   quarantined (:mod:`.quarantine`: moved aside, logged, listed by ``criv doctor``) and
   nothing of its object is removed, unmounted, killed or released; a directory with no
   record at all (its creation or removal was cut short) is an orphan;
2. per pod: a PENDING pod (criv died inside RunPodSandbox) is torn down; a READY pod
   whose agent is alive is reconnected, its containers refreshed from the agent, the
   event watcher and log followers resumed from their persisted offsets; a READY pod
   whose agent is gone becomes NOTREADY, its unfinished containers EXITED with reason
   ``AgentGone``, and its network is released; a NOTREADY pod gets any leftover
   agent killed and network released;
3. retries CNI DELs that failed after their pod's record went (:mod:`.cnidel`);
4. sweeps what no record owns, item by item (one that fails is logged and left, and
   no directory with a mount still under it is deleted): netns files, mounts under the
   state dir, pod dirs and socket dirs; each isolation mode sweeps its own (host:
   criv-agent processes started for this run dir; vm: libvirt domains tagged with this
   state dir, vsock backends under this run dir, taps left in the host netns), skipped
   while a pod is quarantined;
5. settles image leases (after the sweep, so no orphan overlay is still mounted): a
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
from dataclasses import dataclass, field
from pathlib import Path

from criv import metrics
from criv.errors import CrivError, ImageNotFound
from criv.mounts import mounts_under
from criv.sandbox import imagevol, quarantine
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
        """Each step goes on past what fails in it: one bad pod, mount or record must
        not keep criv from starting (logged, and what cannot be read is quarantined)."""
        ctx = self._ctx
        loaded = await asyncio.to_thread(self._load_records)
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
        try:
            left = await self._cleanup.pending_dels.retry()
            if left:
                log.error("%d CNI DEL(s) still failing; retried at each pod stop", left)
        except Exception:
            log.exception("retrying pending CNI DELs failed")
        await self._sweep(loaded)
        try:
            await self._settle_image_leases(loaded.keep_leases)
        except (CrivError, OSError) as e:
            log.error("settling image leases failed: %s", e)
        log.info(
            "recovered %d pod sandboxes, %d containers",
            len(ctx.pods.all()),
            len(ctx.containers.all()),
        )
        if loaded.pods or loaded.containers:
            log.error(
                "%d pod and %d container record(s) are quarantined (unreadable): their "
                "mounts, processes and image leases are kept; `criv doctor` lists them",
                len(loaded.pods),
                len(loaded.containers),
            )

    def _load_records(self) -> Loaded:
        ctx = self._ctx
        state_dir = Path(ctx.config.state_dir)
        out = Loaded()
        if not ctx.state_root.is_dir():
            return out
        for d in sorted(ctx.state_root.iterdir()):
            record = d / "sandbox.json"
            noted = quarantine.is_quarantined(state_dir, "pod", d.name)
            try:
                pod = ctx.pods.load(record)
            except Exception as e:
                if noted or record.exists():
                    if not noted:
                        _quarantine(state_dir, "pod", d.name, d.name, record, e)
                    out.pods.add(d.name)
                    out.keep_leases |= _container_ids(d / "containers")
                else:  # no record at all: a pod dir whose creation or removal was cut short
                    log.warning("pod dir %s has no record; removing it", d)
                    out.orphans.append(d)
                continue
            if noted:
                log.warning("pod %s: its record reads again; quarantine note dropped", d.name)
                quarantine.forget(state_dir, "pod", d.name)
            cdir = ctx.paths(pod.id).containers
            if not cdir.is_dir():
                continue
            for c in sorted(cdir.iterdir()):
                self._load_container(state_dir, pod.id, c, out)
        return out

    def _load_container(self, state_dir: Path, pod_id: str, c: Path, out: Loaded) -> None:
        record = c / "container.json"
        noted = quarantine.is_quarantined(state_dir, "container", c.name)
        try:
            self._ctx.containers.load(record)
        except Exception as e:
            if noted or record.exists():
                if not noted:
                    _quarantine(state_dir, "container", c.name, pod_id, record, e)
                out.containers.add(c.name)
            else:
                log.warning("container dir %s has no record; removing it", c)
                out.orphans.append(c)
        else:
            if noted:
                log.warning("container %s: its record reads again; note dropped", c.name)
                quarantine.forget(state_dir, "container", c.name)
        out.keep_leases |= out.containers

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

    async def _settle_image_leases(self, keep: set[str]) -> None:
        """``keep``: containers whose records are quarantined; their overlays may still
        be mounted over the layers their leases hold."""
        ctx = self._ctx
        known = {c.id for c in ctx.containers.all()}
        leased = ctx.images.lease_holders()
        # a container's image volumes hold leases of their own (imagevol.holder)
        stale = {h for h in leased if imagevol.owner(h) not in known | keep}
        if stale:
            log.warning("releasing %d image lease(s) of removed containers", len(stale))
            await ctx.images.release_many(stale)  # collects what they alone kept
        for c in ctx.containers.all():
            wanted = [(c.image_id, c.id)] + [
                (m.image_id, imagevol.holder(c.id, i)) for i, m in enumerate(c.mounts) if m.image
            ]
            for image_id, h in wanted:
                if h not in leased:
                    with contextlib.suppress(ImageNotFound):
                        await ctx.images.acquire(image_id, h)

    # -- the orphan sweep ----------------------------------------------------------

    async def _sweep(self, loaded: Loaded) -> None:
        ctx = self._ctx
        pods = ctx.pods.all()
        # netns of pods criv cannot read or whose DEL is pending stay (PENDING stand-ins)
        pending = await self._cleanup.pending_dels.all()
        keep = [*pods, *(p.as_pod() for p in pending)]
        keep += [_stand_in(pid, self._network.netns_for(pid)) for pid in loaded.pods]
        try:
            with metrics.sweep("network"):
                await self._network.sweep(keep)
        except Exception as e:
            log.error("network sweep failed: %s", e)
        if loaded.pods:
            # A quarantined pod's agent, VM, backend or tap looks like an orphan to them.
            log.error(
                "skipping the isolation modes' orphan sweeps: %d quarantined pod(s) may "
                "still run (see `criv doctor`)",
                len(loaded.pods),
            )
        else:
            for iso in ctx.isolations.values():
                try:
                    with metrics.sweep(iso.mode):
                        await iso.sweep(pods)
                except Exception as e:
                    log.error("%s isolation sweep failed: %s", iso.mode, e)
        await self._sweep_mounts(pods, loaded)
        for d in loaded.orphans:
            if await _remove_unmounted(d):
                metrics.SWEPT.labels(kind="unreadable_record").inc()
        known = {p.id for p in pods} | loaded.pods
        n = await asyncio.to_thread(_remove_unknown_dirs, ctx.state_root, known)
        n += await asyncio.to_thread(_remove_unknown_dirs, ctx.run_root, {k[:12] for k in known})
        metrics.SWEPT.labels(kind="pod_dir").inc(n)

    async def _sweep_mounts(self, pods: list[PodRecord], loaded: Loaded) -> None:
        """Unmount what no record owns under the state dir, one at a time: a mount that
        will not go is logged and left (its directory then stays too)."""
        ctx = self._ctx
        known_pods = {p.id for p in pods}
        known_containers = {c.id for c in ctx.containers.all()} | loaded.containers
        for m in await asyncio.to_thread(mounts_under, ctx.state_root):
            parts = m.relative_to(ctx.state_root).parts
            if parts[0] in loaded.pods:
                continue  # quarantined: nothing of it is touched
            in_unknown_container = (
                len(parts) >= 3 and parts[1] == "containers" and parts[2] not in known_containers
            )
            if parts[0] in known_pods and not in_unknown_container:
                continue  # a live pod's mount (container rootfs, agent's own)
            log.warning("unmounting orphan mount %s", m)
            try:
                await umount_lazy(m)
            except Exception as e:
                log.error("cannot unmount orphan mount %s (left as it is): %s", m, e)
                continue
            metrics.SWEPT.labels(kind="mount").inc()


@dataclass
class Loaded:
    """What loading the records found besides the records themselves."""

    orphans: list[Path] = field(default_factory=list)  # dirs without a record
    pods: set[str] = field(default_factory=set)  # quarantined pod ids
    containers: set[str] = field(default_factory=set)  # quarantined container ids
    keep_leases: set[str] = field(default_factory=set)  # their containers' leases stay


def _quarantine(
    state_dir: Path, kind: str, oid: str, pod_id: str, record: Path, why: Exception
) -> None:
    try:
        quarantine.quarantine(state_dir, kind, oid, pod_id, record, str(why))
    except OSError as e:  # kept all the same; only the note is missing
        log.error("%s %s: record unreadable (%s), cannot quarantine it: %s", kind, oid, why, e)


def _container_ids(cdir: Path) -> set[str]:
    try:
        return {c.name for c in cdir.iterdir()}
    except OSError:
        return set()


def _stand_in(pod_id: str, netns: str) -> PodRecord:
    """A quarantined pod as the netns sweep sees it: PENDING, so its netns is kept."""
    return PodRecord(
        id=pod_id, name="", namespace="", uid="", attempt=0, state=PodState.PENDING,
        created_at_ns=0, handler="", isolation="", config=b"", netns=netns,
    )  # fmt: skip


async def _remove_unmounted(d: Path) -> bool:
    """rmtree ``d`` unless something is still mounted under it: rmtree would walk into
    the mount and delete what it shows (a volume's host directory, a live overlay)."""
    left = await asyncio.to_thread(mounts_under, d)
    if left:
        log.error("keeping %s: still mounted under it: %s", d, ", ".join(map(str, left)))
        return False
    await asyncio.to_thread(shutil.rmtree, d, True)
    return True


def _remove_unknown_dirs(root: Path, known: set[str]) -> int:
    removed = 0
    if root.is_dir():
        for d in list(root.iterdir()):
            if d.name in known:
                continue
            if left := mounts_under(d):
                log.error("keeping %s: still mounted under it: %s", d, left[0])
                continue
            shutil.rmtree(d, True)
            removed += 1
    return removed
