"""Shared state of the sandbox layer: stores, paths, per-pod runtime, record merging.

:class:`SandboxCore` is the base of the pod operations (:mod:`.pods`), container
operations (:mod:`.containers`) and recovery (:mod:`.recovery`), which
:class:`criv.sandbox.manager.SandboxManager` puts together.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from criv.agent.client import AgentClient
from criv.agent.logstream import LogFollower
from criv.agent.types import AgentContainerInfo, AgentContainerState
from criv.config import Config
from criv.errors import FailedPrecondition, NotFound
from criv.network.cni import Cni
from criv.sandbox.events import EventBus, EventKind
from criv.sandbox.host import HostIsolation
from criv.sandbox.isolation import Isolation, PodPaths
from criv.sandbox.names import NameIndex
from criv.sandbox.records import (
    CONTAINER_KIND,
    CONTAINER_VERSION,
    POD_KIND,
    POD_VERSION,
    ContainerRecord,
    PodRecord,
    Store,
)
from criv.sandbox.states import CONTAINER_TRANSITIONS, ContainerState
from criv.sandbox.vm import VmIsolation
from criv.state.runtime_state import RuntimeState

log = logging.getLogger("criv.sandbox")

# How long a status call waits for the tail of an exited container's log to reach the
# host file, so "exited" is never reported before the last lines are readable.
LOG_DRAIN_TIMEOUT = 2.0

_AGENT_STATES = {
    AgentContainerState.CREATED: ContainerState.CREATED,
    AgentContainerState.RUNNING: ContainerState.RUNNING,
    AgentContainerState.EXITED: ContainerState.EXITED,
    AgentContainerState.UNKNOWN: ContainerState.UNKNOWN,
}


class ImageSource(Protocol):
    """What the sandbox layer needs of the image store (criv.image.manager.ImageManager).

    A container holds a lease (holder: its id) on its image's layers from before its
    rootfs is mounted until after it is unmounted, so removing the image never deletes
    layer dirs under a mounted overlay.
    """

    def get(self, ref: str) -> Any: ...

    async def acquire(self, ref: str, holder: str) -> Any: ...

    async def release(self, holder: str) -> None: ...

    async def release_many(self, holders: Iterable[str]) -> None: ...

    def lease_holders(self) -> set[str]: ...


def merge_info(rec: ContainerRecord, info: AgentContainerInfo) -> ContainerRecord:
    """The record updated with what the agent reports; an illegal state change from
    the agent (say, RUNNING back to CREATED) is ignored rather than trusted."""
    state = _AGENT_STATES[info.state]
    if state not in CONTAINER_TRANSITIONS[rec.state]:
        state = rec.state
    if state is rec.state is ContainerState.EXITED:
        return rec  # final: nothing the agent says later changes how it ended
    return dataclasses.replace(
        rec,
        state=state,
        started_at_ns=info.started_at_ns or rec.started_at_ns,
        finished_at_ns=info.finished_at_ns or rec.finished_at_ns,
        exit_code=info.exit_code if state is ContainerState.EXITED else rec.exit_code,
        reason=info.reason or rec.reason,
        message=info.message or rec.message,
        pid=info.pid,
        resources=info.resources or rec.resources,
    )


@dataclass
class PodRuntime:
    """In-memory companions of a pod record: the agent connection and its tasks."""

    client: AgentClient | None = None
    watcher: asyncio.Task[None] | None = None
    followers: dict[str, LogFollower] = field(default_factory=dict)


class SandboxCore:
    def __init__(self, config: Config, images: ImageSource, runtime_state: RuntimeState) -> None:
        self.config = config
        self.images = images
        self.runtime_state = runtime_state
        self.state_root = Path(config.state_dir) / "sandboxes"
        self.run_root = Path(config.run_dir) / "p"
        self.pods: Store[PodRecord] = Store(
            POD_KIND, POD_VERSION, lambda p: self.paths(p.id).record, PodRecord.from_dict
        )
        self.containers: Store[ContainerRecord] = Store(
            CONTAINER_KIND,
            CONTAINER_VERSION,
            lambda c: self.container_dir(c.sandbox_id, c.id) / "container.json",
            ContainerRecord.from_dict,
        )
        self.pod_names = NameIndex("pod sandbox")
        self.container_names = NameIndex("container")
        self.bus = EventBus()
        self.cni = Cni(config.cni)
        self.isolations: dict[str, Isolation] = {
            "host": HostIsolation(config),
            "vm": VmIsolation(config, runtime_state),
        }
        self.rt: dict[str, PodRuntime] = defaultdict(PodRuntime)
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background task criv keeps a reference to (and cancels at close)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            # Bounded: a task that swallowed its cancellation must not hang shutdown.
            await asyncio.wait(tasks, timeout=5.0)

    # -- paths --------------------------------------------------------------------

    def paths(self, pod_id: str) -> PodPaths:
        return PodPaths(self.state_root / pod_id, self.run_root / pod_id[:12])

    def container_dir(self, pod_id: str, cid: str) -> Path:
        return self.paths(pod_id).containers / cid

    def lock(self, rid: str) -> asyncio.Lock:
        return self._locks[rid]

    def forget_lock(self, rid: str) -> None:
        """Drop the lock of a removed id (a late caller finds no record anyway)."""
        lock = self._locks.get(rid)
        if lock is not None and not lock.locked():
            del self._locks[rid]

    def isolation(self, pod: PodRecord) -> Isolation:
        iso = self.isolations.get(pod.isolation)
        if iso is None:
            raise FailedPrecondition(f"isolation mode {pod.isolation!r} is not available")
        return iso

    # -- lookups ------------------------------------------------------------------

    def pod(self, pod_id: str) -> PodRecord:
        full = self.pods.resolve(pod_id)
        if full is None:
            raise NotFound(f"pod sandbox {pod_id!r} not found")
        return self.pods.must(full, "pod sandbox")

    def container(self, cid: str) -> ContainerRecord:
        full = self.containers.resolve(cid)
        if full is None:
            raise NotFound(f"container {cid!r} not found")
        return self.containers.must(full, "container")

    def containers_of(self, pod_id: str) -> list[ContainerRecord]:
        return [c for c in self.containers.all() if c.sandbox_id == pod_id]

    def client_of(self, pod_id: str) -> AgentClient | None:
        rt = self.rt.get(pod_id)
        return rt.client if rt is not None else None

    # -- record updates that publish events -------------------------------------

    async def apply_info(self, cid: str, info: AgentContainerInfo) -> ContainerRecord | None:
        if self.containers.get(cid) is None:
            return None
        old, new = await self.containers.update_pair(cid, lambda r: merge_info(r, info))
        self.publish_transition(old, new)
        return new

    async def set_state(
        self, cid: str, state: ContainerState, *, exit_code: int = 0, reason: str = "",
        message: str = "", finished_at_ns: int = 0,
    ) -> ContainerRecord | None:  # fmt: skip
        old = self.containers.get(cid)
        if old is None or old.state is state:
            return old

        def fn(r: ContainerRecord) -> ContainerRecord:
            if state not in CONTAINER_TRANSITIONS[r.state]:
                return r
            return dataclasses.replace(
                r,
                state=state,
                exit_code=exit_code if state is ContainerState.EXITED else r.exit_code,
                reason=reason or r.reason,
                message=message or r.message,
                finished_at_ns=finished_at_ns or r.finished_at_ns,
            )

        old, new = await self.containers.update_pair(cid, fn)
        self.publish_transition(old, new)
        return new

    def publish_transition(self, old: ContainerRecord, new: ContainerRecord) -> None:
        if old.state is new.state:
            return
        if new.state is ContainerState.RUNNING and old.state is ContainerState.CREATED:
            self.bus.publish(EventKind.STARTED, new.id, new.sandbox_id)
        elif new.state is ContainerState.EXITED:
            self.bus.publish(EventKind.STOPPED, new.id, new.sandbox_id)

    # -- log followers ------------------------------------------------------------

    def start_follower(self, pod: PodRecord, c: ContainerRecord) -> None:
        if not c.log_path or c.log_done:
            return
        rt = self.rt[pod.id]
        if c.id in rt.followers:
            return
        iso = self.isolation(pod)
        f = LogFollower(
            iso.data_endpoint(self.paths(pod.id)),
            c.id,
            Path(c.log_path),
            self.container_dir(pod.id, c.id) / "log.offset",
        )
        rt.followers[c.id] = f
        f.start()
        self.spawn(self._mark_log_done(c.id, f), f"logdone-{c.id[:12]}")

    async def _mark_log_done(self, cid: str, f: LogFollower) -> None:
        await f.done.wait()
        if self.containers.get(cid) is not None:
            with contextlib.suppress(Exception):
                await self.containers.update(cid, lambda r: dataclasses.replace(r, log_done=True))

    async def drain_log(self, c: ContainerRecord, timeout: float = LOG_DRAIN_TIMEOUT) -> None:
        rt = self.rt.get(c.sandbox_id)
        f = rt.followers.get(c.id) if rt is not None else None
        if f is not None:
            await f.wait(timeout)

    async def stop_follower(self, pod_id: str, cid: str) -> None:
        rt = self.rt.get(pod_id)
        f = rt.followers.pop(cid, None) if rt is not None else None
        if f is not None:
            await f.stop()
