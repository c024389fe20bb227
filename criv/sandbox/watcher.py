"""The agent watcher: one task per READY pod that keeps its container records current
from the agent's event stream, and notices when the agent (or the VM) is gone.

The guest is not trusted: an event counts only for a container of the pod whose agent
sent it (a forged event for another pod's container is dropped and logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from criv.agent.types import AgentContainerState
from criv.errors import CrivError
from criv.sandbox.context import SandboxContext
from criv.sandbox.records import PodRecord
from criv.sandbox.states import ContainerState, PodState
from criv.sandbox.transitions import apply_info, set_state

log = logging.getLogger("criv.sandbox.watcher")


class AgentWatcher:
    def __init__(self, ctx: SandboxContext) -> None:
        self._ctx = ctx

    def start(self, pod_id: str) -> None:
        rt = self._ctx.runtime(pod_id)
        if rt.watcher is None or rt.watcher.done():
            rt.watcher = self._ctx.tasks.spawn(self._watch(pod_id), f"watch-{pod_id[:12]}")

    async def stop(self, pod_id: str) -> None:
        rt = self._ctx.rt.get(pod_id)
        if rt is not None and rt.watcher is not None:
            rt.watcher.cancel()
            with contextlib.suppress(BaseException):
                await rt.watcher
            rt.watcher = None

    async def _watch(self, pod_id: str) -> None:
        ctx = self._ctx
        backoff = 0.1
        foreign_logged = False
        while True:
            pod = ctx.pods.get(pod_id)
            client = ctx.client_of(pod_id)
            if pod is None or client is None or pod.state is not PodState.READY:
                return
            try:
                async for ev in client.events():
                    backoff = 0.1
                    c = ctx.containers.get(ev.container_id)
                    if c is None:
                        continue
                    if c.sandbox_id != pod_id:
                        if not foreign_logged:
                            log.warning(
                                "pod %s: its agent sent an event for container %s of "
                                "another pod; dropped (further ones are dropped silently)",
                                pod_id[:12], ev.container_id[:12],
                            )  # fmt: skip
                            foreign_logged = True
                        continue
                    info = ev.info
                    if info is None or info.state is not AgentContainerState.EXITED:
                        with contextlib.suppress(CrivError):
                            info = await client.container_status(ev.container_id)
                    if info is not None and info.container_id == ev.container_id:
                        await apply_info(ctx, ev.container_id, info)
            except CrivError as e:
                log.debug("pod %s: event stream ended: %s", pod_id[:12], e)
            pod = ctx.pods.get(pod_id)
            if pod is None or pod.state is not PodState.READY:
                return
            if not await ctx.isolation(pod).alive(pod):
                await self._agent_lost(pod)
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _agent_lost(self, pod: PodRecord) -> None:
        ctx = self._ctx
        if ctx.isolation(pod).containers_die_with_agent:
            await self._vm_lost(pod)
            return
        log.error("pod %s: agent is gone; its containers are in an unknown state", pod.id[:12])
        for c in ctx.containers_of(pod.id):
            if c.state is ContainerState.RUNNING:
                await set_state(
                    ctx, c.id, ContainerState.UNKNOWN, reason="AgentGone",
                    message="the pod's agent exited; the container's fate is unknown",
                )  # fmt: skip
            elif c.state is ContainerState.CREATED:
                await set_state(
                    ctx, c.id, ContainerState.EXITED, exit_code=255, reason="AgentGone",
                    message="the pod's agent exited before the container started",
                    finished_at_ns=time.time_ns(),
                )  # fmt: skip

    async def _vm_lost(self, pod: PodRecord) -> None:
        """The pod's VM stopped under criv (QEMU killed, guest crash): whatever ran in it
        is over. Containers EXITED, the sandbox NOTREADY; kubelet stops and removes it."""
        ctx = self._ctx
        log.error("pod %s: its VM stopped unexpectedly; see %s", pod.id[:12],
                  ctx.paths(pod.id).state / "console.log")  # fmt: skip
        now = time.time_ns()
        for c in ctx.containers_of(pod.id):
            if c.state is not ContainerState.EXITED:
                await set_state(
                    ctx, c.id, ContainerState.EXITED, exit_code=137 if c.started_at_ns else 255,
                    reason="VMExited", message="the pod's VM stopped unexpectedly",
                    finished_at_ns=now,
                )  # fmt: skip
        async with ctx.locks.hold(pod.id):
            if (p := ctx.pods.get(pod.id)) is not None and p.state is PodState.READY:
                await ctx.pods.update(
                    pod.id,
                    lambda r: dataclasses.replace(
                        r, state=PodState.NOTREADY, message="the pod's VM stopped unexpectedly"
                    ),
                )
