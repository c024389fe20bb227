"""Container operations: create, start, stop, remove, status, list, exec, stats.

The agent owns the container (OCI spec, crun, exit status); criv owns the record,
the root filesystem mount, the host log file and the name. Records are refreshed
from the agent on status calls and from its event stream; ListContainers answers
from records so kubelet's frequent relists cost no agent round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import time
from pathlib import Path

from criv import failpoints
from criv.agent.client import AgentClient
from criv.agent.logstream import open_log
from criv.agent.types import CreateContainerArgs, ExecResult, MountSpec
from criv.errors import AgentError, CrivError, DeadlineExceeded, FailedPrecondition, NotFound
from criv.sandbox import imagevol, seccomp_profile, userns
from criv.sandbox.cleanup import PodCleanup
from criv.sandbox.context import SandboxContext
from criv.sandbox.events import EventKind
from criv.sandbox.logs import LogFollowers
from criv.sandbox.records import ContainerRecord, MountRecord, PodRecord
from criv.sandbox.rootfs import RootfsMounter
from criv.sandbox.scratch import PodScratch
from criv.sandbox.specs import ContainerFilter, ContainerSpec, match_container
from criv.sandbox.states import ContainerState, PodState
from criv.sandbox.stats import ContainerSample, CpuRates
from criv.sandbox.transitions import apply_info, set_state

log = logging.getLogger("criv.sandbox.containers")


def host_log_path(log_directory: str, log_path: str) -> str:
    """Where the container's CRI log goes on the host ("" when kubelet asked none).

    As containerd: the log path is always joined under the pod's log directory, an
    absolute one too, and no log without both. Neither ``..`` nor a symlink already
    there may lead outside the directory.
    """
    if not log_path or not log_directory:
        return ""
    base = os.path.normpath(log_directory)
    joined = os.path.normpath(os.path.join(base, log_path.lstrip("/")))
    if not _within(joined, base):
        raise FailedPrecondition(f"log path {log_path[:200]!r} escapes the log directory")
    if not _within(os.path.realpath(joined), os.path.realpath(base)):
        raise FailedPrecondition(f"log path {log_path[:200]!r} leads out of the log directory")
    return joined


def _within(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def create_log_file(path: str) -> None:
    """Create the container's log before it starts, as containerd does: a caller may
    open it as soon as StartContainer returns, before any output reached the host (the
    log follower appends to it)."""
    try:
        fd = open_log(path)
    except OSError as e:
        raise FailedPrecondition(f"cannot create the log {path[:200]!r}: {e.strerror}") from e
    os.close(fd)


class ContainerService:
    def __init__(
        self,
        ctx: SandboxContext,
        cleanup: PodCleanup,
        logs: LogFollowers,
        rootfs: RootfsMounter,
        scratch: PodScratch,
    ) -> None:
        self._ctx = ctx
        self._cleanup = cleanup
        self._logs = logs
        self._rootfs = rootfs
        self._scratch = scratch
        self._cpu = CpuRates()

    # -- create / start ------------------------------------------------------------

    async def create(self, pod_id: str, spec: ContainerSpec) -> str:
        ctx = self._ctx
        pod = ctx.pod(pod_id)
        if pod.state is not PodState.READY:
            raise FailedPrecondition(f"pod sandbox {pod.id[:12]} is not ready")
        client = ctx.client_of(pod.id)
        if client is None:
            raise AgentError(f"pod sandbox {pod.id[:12]}: agent not connected")
        name = pod.container_reserved_name(spec.name, spec.attempt)
        cid = secrets.token_hex(32)
        ctx.container_names.reserve(name, cid)
        try:
            return await self._create(pod, client, spec, cid)
        except BaseException:
            ctx.container_names.release(name, cid)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._release_image_if_unmounted(pod.id, cid))
            raise

    async def _create(
        self, pod: PodRecord, client: AgentClient, spec: ContainerSpec, cid: str
    ) -> str:
        ctx = self._ctx
        userns.refuse_unless_supported(pod.isolation, pod.handler, spec.userns)
        # Lease before anything is mounted: from here a RemoveImage leaves the layers
        # alone. A crash before the record is written leaves a lease with no container,
        # which recovery releases.
        seccomp_json = await seccomp_profile.load(spec.seccomp_localhost)
        image = await ctx.images.acquire(spec.image, cid)
        vols = await imagevol.acquire(ctx.images, cid, spec.mounts)
        failpoints.hit("create_container.after_lease")
        iso = ctx.isolation(pod)
        paths = ctx.paths(pod.id)
        await iso.check_image(pod, paths, cid, image.id, list(image.layer_dirs))
        cdir = ctx.container_dir(pod.id, cid)
        rec = ContainerRecord(
            id=cid,
            sandbox_id=pod.id,
            name=spec.name,
            attempt=spec.attempt,
            state=ContainerState.CREATED,
            created_at_ns=time.time_ns(),
            config=spec.config,
            image=spec.image,
            image_id=image.id,
            image_ref=image.repo_digests[0] if image.repo_digests else image.id,
            labels=dict(spec.labels),
            annotations=dict(spec.annotations),
            log_path=host_log_path(pod.log_directory, spec.log_path),
            mounts=imagevol.with_volumes(spec.mounts, vols),
            rootfs=str(cdir / "rootfs"),
            resources=spec.resources,
        )
        async with ctx.locks.hold(pod.id):
            if ctx.pods.get(pod.id) is None:
                raise NotFound(f"pod sandbox {pod.id[:12]} was removed")
            await ctx.containers.add(rec)
            try:
                failpoints.hit("create_container.after_record")
                # the writable layer goes in the pod's scratch fs (made at its first
                # container: the bound on its disk use), if there is one
                writable = await self._scratch.prepare(paths.state, cid) or cdir
                failpoints.hit("create_container.after_scratch")
                rootfs = await self._rootfs.mount(
                    list(image.layer_dirs),
                    cdir,
                    writable,
                    userns=spec.userns,
                    searchable=pod.isolation in userns.ROOTFS_BY_HOST_PATH,
                )
                failpoints.hit("create_container.after_rootfs")
                if rec.log_path:
                    await asyncio.to_thread(
                        Path(rec.log_path).parent.mkdir, parents=True, exist_ok=True
                    )
                # image volumes: mounted read-only on the host, then shared as any
                sources = list(rec.mounts)
                for v in vols:
                    host = await imagevol.mount(cdir, v)
                    sources[v.index] = dataclasses.replace(
                        v.mount, host_path=str(host), propagation=0
                    )
                # vm pods: bind mounts into the pod's share; host pods: as they are
                mounts = [
                    MountSpec(m.container_path, await iso.share(paths, cid, m, f"m{i}"))
                    for i, m in enumerate(sources)
                ]
                args = CreateContainerArgs(
                    container_id=cid,
                    sandbox_id=pod.id,
                    config=spec.config,
                    sandbox_config=pod.config,
                    image_config_json=image.config_json,
                    rootfs=await iso.share(paths, cid, MountRecord("/", str(rootfs)), "rootfs"),
                    mounts=mounts,
                    seccomp_profile_json=seccomp_json,
                )
                failpoints.hit("create_container.after_share")
                info = await client.create_container(args)
                failpoints.hit("create_container.after_agent")
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._undo_create(rec))
                raise
        await apply_info(ctx, cid, info)
        ctx.bus.publish(EventKind.CREATED, cid, pod.id)
        return cid

    async def _undo_create(self, rec: ContainerRecord) -> None:
        ctx = self._ctx
        client = ctx.client_of(rec.sandbox_id)
        if client is not None:
            with contextlib.suppress(CrivError):
                await client.remove_container(rec.id)
        pod = ctx.pods.get(rec.sandbox_id)
        if pod is not None:
            await ctx.isolation(pod).unshare(ctx.paths(pod.id), rec.id)
        cdir = await self._cleanup.unmount_rootfs(rec.sandbox_id, rec.id)
        await ctx.containers.delete(rec.id, remove_dir=cdir)

    async def _release_image_if_unmounted(self, pod_id: str, cid: str) -> None:
        """A failed create's leases go, unless undoing it left the rootfs or an image
        volume mounted: their layers are its lowerdirs (recovery's sweep unmounts it and
        releases)."""
        cdir = self._ctx.container_dir(pod_id, cid)
        if await self._rootfs.is_mounted(cdir) or await imagevol.any_mounted(cdir):
            log.error("container %s: rootfs or image volume still mounted, leases kept", cid[:12])
            return
        images = self._ctx.images
        await images.release_many(imagevol.holders_of(images.lease_holders(), cid))

    async def start(self, cid: str) -> None:
        ctx = self._ctx
        c = ctx.container(cid)
        # lock order: pod, then container (a StopPodSandbox cannot run beside a start,
        # so no log follower starts after the agent was stopped)
        async with ctx.locks.hold(c.sandbox_id), ctx.locks.hold(c.id):
            c = ctx.containers.must(c.id)
            if c.state is not ContainerState.CREATED:
                raise FailedPrecondition(f"container {c.id[:12]} is {c.state.value}, not created")
            pod = ctx.pods.must(c.sandbox_id)
            client = ctx.client_of(pod.id)
            if client is None or pod.state is not PodState.READY:
                raise FailedPrecondition(f"pod sandbox {pod.id[:12]} is not ready")
            if c.log_path:
                await asyncio.to_thread(create_log_file, c.log_path)
            info = await client.start_container(c.id)
            failpoints.hit("start_container.after_agent")
            c = await apply_info(ctx, c.id, info) or c
            failpoints.hit("start_container.after_record")
            self._logs.start(pod, c)

    # -- stop / remove ---------------------------------------------------------------

    async def stop(self, cid: str, timeout: int) -> None:
        ctx = self._ctx
        full = ctx.containers.resolve(cid)
        if full is None:
            return  # idempotent
        async with ctx.locks.hold(full):
            c = ctx.containers.get(full)
            if c is None or c.state is ContainerState.EXITED:
                return
            client = ctx.client_of(c.sandbox_id)
            if client is None:
                await set_state(
                    ctx, c.id, ContainerState.EXITED, exit_code=255, reason="AgentGone",
                    message="no agent to stop it", finished_at_ns=time.time_ns(),
                )  # fmt: skip
                return
            try:
                info = await client.stop_container(c.id, max(timeout, 0))
            except NotFound:
                await set_state(
                    ctx, c.id, ContainerState.EXITED, exit_code=255, reason="Unknown",
                    message="the agent no longer knows this container",
                    finished_at_ns=time.time_ns(),
                )  # fmt: skip
                return
            c = await apply_info(ctx, c.id, info) or c
        await self._logs.drain(c)

    async def remove(self, cid: str) -> None:
        ctx = self._ctx
        full = ctx.containers.resolve(cid)
        if full is None:
            return
        c = ctx.containers.must(full)
        if c.state is not ContainerState.EXITED:
            await self.stop(full, 0)
        async with ctx.locks.hold(c.sandbox_id), ctx.locks.hold(full):
            c2 = ctx.containers.get(full)
            if c2 is None:
                return  # removed meanwhile (RemovePodSandbox)
            client = ctx.client_of(c2.sandbox_id)
            if client is not None:
                try:
                    await client.remove_container(full)
                except NotFound:
                    pass
                except AgentError as e:
                    log.warning("container %s: agent remove failed: %s", full[:12], e)
            await self._cleanup.remove_container_files(c2)
        ctx.bus.publish(EventKind.DELETED, full, c.sandbox_id)

    # -- status / list ---------------------------------------------------------------

    async def status(self, cid: str) -> ContainerRecord:
        ctx = self._ctx
        c = ctx.container(cid)
        client = ctx.client_of(c.sandbox_id)
        if client is not None and c.state is not ContainerState.EXITED:
            try:
                info = await client.container_status(c.id)
                c = await apply_info(ctx, c.id, info) or c
            except NotFound:
                pass
            except AgentError as e:
                log.warning("container %s: status from agent failed: %s", c.id[:12], e)
        if c.state is ContainerState.EXITED and not c.log_done:
            await self._logs.drain(c)
            c = ctx.containers.get(c.id) or c
        return c

    def matching(self, f: ContainerFilter) -> list[ContainerRecord]:
        return sorted(
            (c for c in self._ctx.containers.all() if match_container(f, c)),
            key=lambda c: c.created_at_ns,
        )

    # -- exec / resources / logs -------------------------------------------------------

    def _running(self, cid: str) -> tuple[ContainerRecord, AgentClient]:
        c = self._ctx.container(cid)
        if c.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"container {c.id[:12]} is {c.state.value}, not running")
        client = self._ctx.client_of(c.sandbox_id)
        if client is None:
            raise AgentError(f"container {c.id[:12]}: agent not connected")
        return c, client

    async def exec_sync(self, cid: str, cmd: list[str], timeout: int) -> ExecResult:
        if not cmd:
            raise FailedPrecondition("ExecSync needs a command")
        c, client = self._running(cid)
        result = await client.exec_sync(c.id, cmd, timeout)
        if result.timed_out:
            raise DeadlineExceeded(f"command {cmd[0]!r} timed out after {timeout}s")
        return result

    async def update_resources(self, cid: str, linux: bytes) -> None:
        ctx = self._ctx
        c = ctx.container(cid)
        client = ctx.client_of(c.sandbox_id)
        if c.state not in (ContainerState.CREATED, ContainerState.RUNNING):
            raise FailedPrecondition(f"container {c.id[:12]} is {c.state.value}")
        if client is None:
            raise AgentError(f"container {c.id[:12]}: agent not connected")
        await client.update_resources(c.id, linux)
        await ctx.containers.update(c.id, lambda r: dataclasses.replace(r, resources=linux))

    async def reopen_log(self, cid: str) -> None:
        c = self._ctx.container(cid)
        if c.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"container {c.id[:12]} is not running")
        if not await self._logs.reopen(c):
            raise FailedPrecondition(f"container {c.id[:12]} has no log to reopen")

    async def stats(self, cids: list[str]) -> dict[str, ContainerSample]:
        """Stats of running containers among ``cids``, one agent call per pod."""
        ctx = self._ctx
        by_pod: dict[str, list[str]] = {}
        for cid in cids:
            c = ctx.containers.get(cid)
            if c is not None and c.state is ContainerState.RUNNING:
                by_pod.setdefault(c.sandbox_id, []).append(cid)
        out: dict[str, ContainerSample] = {}

        async def one(pod_id: str, ids: list[str]) -> None:
            client = ctx.client_of(pod_id)
            if client is None:
                return
            try:
                for s in await client.stats(ids):
                    if s.container_id in ids:  # the agent speaks only for its own pod
                        out[s.container_id] = self._cpu.sample(s)
            except CrivError as e:
                log.warning("pod %s: stats failed: %s", pod_id[:12], e)

        await asyncio.gather(*(one(p, ids) for p, ids in by_pod.items()))
        self._cpu.forget_all_but(c.id for c in ctx.containers.all())
        return out
