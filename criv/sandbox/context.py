"""SandboxContext: what the sandbox services share, and nothing they do.

The pod, container and recovery services (:mod:`.pods`, :mod:`.containers`,
:mod:`.recovery`) are built over one context: the record stores, the name indexes, the
operation locks (:mod:`.locks` gives their order), the per-pod runtime companions
(agent connection, watcher, log followers), the event bus, background tasks, and the
isolation modes by name (injected, so a unit test hands in fakes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from criv.agent.client import AgentClient
from criv.agent.logstream import LogFollower
from criv.config import Config
from criv.errors import FailedPrecondition
from criv.sandbox.events import EventBus
from criv.sandbox.isolation import Isolation, PodPaths
from criv.sandbox.locks import KeyedLocks
from criv.sandbox.names import NameIndex
from criv.sandbox.records import (
    CONTAINER_KIND,
    CONTAINER_VERSION,
    POD_KIND,
    POD_VERSION,
    ContainerRecord,
    PodRecord,
    check_container_record,
    check_pod_record,
)
from criv.sandbox.store import Store
from criv.sandbox.tasks import BackgroundTasks
from criv.state.runtime_state import RuntimeState


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


@dataclass
class PodRuntime:
    """In-memory companions of a pod record: the agent connection and its tasks."""

    client: AgentClient | None = None
    watcher: asyncio.Task[None] | None = None
    followers: dict[str, LogFollower] = field(default_factory=dict)


class SandboxContext:
    def __init__(
        self,
        config: Config,
        images: ImageSource,
        runtime_state: RuntimeState,
        isolations: Mapping[str, Isolation],
    ) -> None:
        self.config = config
        self.images = images
        self.runtime_state = runtime_state
        self.isolations = dict(isolations)
        self.state_root = Path(config.state_dir) / "sandboxes"
        self.run_root = Path(config.run_dir) / "p"
        self.pods: Store[PodRecord] = Store(
            POD_KIND, POD_VERSION, lambda p: self.paths(p.id).record,
            PodRecord.from_dict, check_pod_record, "pod sandbox",
        )  # fmt: skip
        self.containers: Store[ContainerRecord] = Store(
            CONTAINER_KIND, CONTAINER_VERSION,
            lambda c: self.container_dir(c.sandbox_id, c.id) / "container.json",
            ContainerRecord.from_dict, check_container_record, "container",
        )  # fmt: skip
        self.pod_names = NameIndex("pod sandbox")
        self.container_names = NameIndex("container")
        self.locks = KeyedLocks()  # operation locks by pod / container id
        self.bus = EventBus()
        self.tasks = BackgroundTasks()
        self.rt: dict[str, PodRuntime] = {}

    # -- paths ----------------------------------------------------------------------

    def paths(self, pod_id: str) -> PodPaths:
        return PodPaths(self.state_root / pod_id, self.run_root / pod_id[:12])

    def container_dir(self, pod_id: str, cid: str) -> Path:
        return self.paths(pod_id).containers / cid

    # -- lookups --------------------------------------------------------------------

    def isolation(self, pod: PodRecord) -> Isolation:
        iso = self.isolations.get(pod.isolation)
        if iso is None:
            raise FailedPrecondition(f"isolation mode {pod.isolation!r} is not available")
        return iso

    def pod(self, pod_id: str) -> PodRecord:
        """By id or unique prefix; NotFound / AmbiguousId otherwise."""
        return self.pods.find(pod_id)

    def container(self, cid: str) -> ContainerRecord:
        return self.containers.find(cid)

    def containers_of(self, pod_id: str) -> list[ContainerRecord]:
        return [c for c in self.containers.all() if c.sandbox_id == pod_id]

    def runtime(self, pod_id: str) -> PodRuntime:
        return self.rt.setdefault(pod_id, PodRuntime())

    def client_of(self, pod_id: str) -> AgentClient | None:
        rt = self.rt.get(pod_id)
        return rt.client if rt is not None else None
