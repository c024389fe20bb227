"""Container log followers: each running container's CRI log streamed from its agent
into the host log file, resumed from a persisted offset after a criv restart."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

from criv.agent.logstream import LogFollower
from criv.sandbox.context import SandboxContext
from criv.sandbox.records import ContainerRecord, PodRecord

# How long a status call waits for the tail of an exited container's log to reach the
# host file, so "exited" is never reported before the last lines are readable.
LOG_DRAIN_TIMEOUT = 2.0


class LogFollowers:
    def __init__(self, ctx: SandboxContext) -> None:
        self._ctx = ctx

    def _get(self, pod_id: str, cid: str) -> LogFollower | None:
        rt = self._ctx.rt.get(pod_id)
        return rt.followers.get(cid) if rt is not None else None

    def start(self, pod: PodRecord, c: ContainerRecord) -> None:
        if not c.log_path or c.log_done:
            return
        rt = self._ctx.runtime(pod.id)
        if c.id in rt.followers:
            return
        iso = self._ctx.isolation(pod)
        f = LogFollower(
            iso.data_endpoint(self._ctx.paths(pod.id)),
            c.id,
            Path(c.log_path),
            self._ctx.container_dir(pod.id, c.id) / "log.offset",
        )
        rt.followers[c.id] = f
        f.start()
        self._ctx.tasks.spawn(self._mark_done(c.id, f), f"logdone-{c.id[:12]}")

    async def _mark_done(self, cid: str, f: LogFollower) -> None:
        await f.done.wait()
        if self._ctx.containers.get(cid) is not None:
            with contextlib.suppress(Exception):
                await self._ctx.containers.update(
                    cid, lambda r: dataclasses.replace(r, log_done=True)
                )

    async def drain(self, c: ContainerRecord, timeout: float = LOG_DRAIN_TIMEOUT) -> None:
        f = self._get(c.sandbox_id, c.id)
        if f is not None:
            await f.wait(timeout)

    async def stop(self, pod_id: str, cid: str) -> None:
        rt = self._ctx.rt.get(pod_id)
        f = rt.followers.pop(cid, None) if rt is not None else None
        if f is not None:
            await f.stop()

    async def stop_pod(self, pod_id: str) -> None:
        rt = self._ctx.rt.get(pod_id)
        for cid in list(rt.followers) if rt is not None else []:
            await self.stop(pod_id, cid)

    async def reopen(self, c: ContainerRecord) -> bool:
        """Reopen the host log file (after kubelet rotated it); False: no follower."""
        f = self._get(c.sandbox_id, c.id)
        if f is None:
            return False
        await asyncio.to_thread(f.reopen)
        return True
