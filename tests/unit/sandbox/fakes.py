"""Fakes of the sandbox layer's collaborators (isolation mode, agent, pod network,
rootfs, image store), so pod and container orchestration can be driven without
processes, VMs, netns or mounts. Each records what was asked of it and can be told to
fail or block at a named step."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from criv.agent.types import (
    AgentContainerInfo,
    AgentContainerState,
    AgentEvent,
    AgentEventKind,
    AgentStats,
    CreateContainerArgs,
)
from criv.errors import Internal, NotFound
from criv.sandbox.isolation import PodPaths
from criv.sandbox.isostate import HostState, IsolationState
from criv.sandbox.network import Attachment
from criv.sandbox.records import MountRecord, PodRecord


class Steps:
    """Calls made, in order; ``fail`` names steps that raise, ``block`` steps that wait
    for their event to be set."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.block: dict[str, asyncio.Event] = {}

    async def step(self, name: str) -> None:
        self.calls.append(name)
        if name in self.block:
            await self.block[name].wait()
        if name in self.fail:
            raise Internal(f"injected failure at {name}")

    def count(self, name: str) -> int:
        return self.calls.count(name)


class FakeAgent:
    def __init__(self, steps: Steps, pod_id: str) -> None:
        self.steps = steps
        self.pod_id = pod_id
        self.containers: dict[str, AgentContainerInfo] = {}
        self.events_q: asyncio.Queue[AgentEvent | None] = asyncio.Queue()
        self.closed = False

    def emit(self, cid: str, info: AgentContainerInfo | None) -> None:
        self.events_q.put_nowait(AgentEvent(AgentEventKind.EXITED, cid, 1, info))

    def end_events(self) -> None:
        self.events_q.put_nowait(None)

    async def events(self) -> AsyncIterator[AgentEvent]:
        while (ev := await self.events_q.get()) is not None:
            yield ev

    async def health(self, timeout: float = 1.0) -> None:
        pass

    async def setup_sandbox(self, *args: Any, **kwargs: Any) -> None:
        await self.steps.step("setup_sandbox")

    async def create_container(self, args: CreateContainerArgs) -> AgentContainerInfo:
        await self.steps.step("agent.create")
        info = AgentContainerInfo(args.container_id, AgentContainerState.CREATED)
        self.containers[args.container_id] = info
        return info

    async def start_container(self, cid: str) -> AgentContainerInfo:
        await self.steps.step("agent.start")
        info = AgentContainerInfo(cid, AgentContainerState.RUNNING, started_at_ns=5, pid=9)
        self.containers[cid] = info
        return info

    async def stop_container(self, cid: str, timeout: int) -> AgentContainerInfo:
        await self.steps.step("agent.stop")
        if cid not in self.containers:
            raise NotFound(cid)
        info = AgentContainerInfo(
            cid, AgentContainerState.EXITED, started_at_ns=5, finished_at_ns=6, exit_code=137
        )
        self.containers[cid] = info
        return info

    async def remove_container(self, cid: str) -> None:
        await self.steps.step("agent.remove")
        self.containers.pop(cid, None)

    async def container_status(self, cid: str) -> AgentContainerInfo:
        if cid not in self.containers:
            raise NotFound(cid)
        return self.containers[cid]

    async def list_containers(self) -> list[AgentContainerInfo]:
        return list(self.containers.values())

    async def stats(self, cids: list[str]) -> list[AgentStats]:
        return [AgentStats(c, 1) for c in cids]

    async def shutdown(self, timeout: int) -> None:
        await self.steps.step("agent.shutdown")

    async def close(self) -> None:
        self.closed = True


class FakeIsolation:
    def __init__(self, steps: Steps, mode: str, containers_die_with_agent: bool) -> None:
        self.steps = steps
        self.mode = mode
        self.containers_die_with_agent = containers_die_with_agent
        self.agents: dict[str, FakeAgent] = {}
        self.dead: set[str] = set()
        self.booted: set[str] = set()
        self.prepared: set[str] = set()  # prepare()d and not yet destroyed

    async def prepare(self, pod: PodRecord, paths: PodPaths) -> None:
        await self.steps.step("prepare")
        self.prepared.add(pod.id)

    async def boot(self, pod: PodRecord, paths: PodPaths) -> IsolationState:
        await self.steps.step("boot")
        self.booted.add(pod.id)
        return HostState(pid=4242, start_time=1)

    async def connect(self, pod: PodRecord, paths: PodPaths, timeout: float) -> Any:
        await self.steps.step("connect")
        agent = FakeAgent(self.steps, pod.id)
        self.agents[pod.id] = agent
        return agent

    async def alive(self, pod: PodRecord) -> bool:
        return pod.id in self.booted and pod.id not in self.dead

    async def stop(self, pod: PodRecord, paths: PodPaths, client: Any, timeout: int) -> None:
        if client is not None:
            await client.shutdown(timeout)
        await self.destroy(pod, paths)

    async def forget(self, pod: PodRecord, paths: PodPaths) -> None:
        self.steps.calls.append("forget")

    async def destroy(self, pod: PodRecord, paths: PodPaths) -> None:
        self.steps.calls.append("destroy")
        self.booted.discard(pod.id)
        self.prepared.discard(pod.id)

    def agent_path(self, paths: PodPaths, host_path: Path) -> str:
        return str(host_path)

    def data_endpoint(self, paths: PodPaths) -> str:
        return str(paths.run / "d.sock")

    async def share(self, paths: PodPaths, cid: str, mount: MountRecord, name: str) -> str:
        await self.steps.step(f"share.{name}")
        return mount.host_path

    def pod_files_dir(self, paths: PodPaths) -> str:
        return ""

    async def check_image(
        self, pod: PodRecord, paths: PodPaths, cid: str, image_id: str, layer_dirs: list[Path]
    ) -> None:
        pass

    async def unshare(self, paths: PodPaths, cid: str) -> None:
        self.steps.calls.append("unshare")

    def guest_network(self, pod: PodRecord) -> None:
        return None

    def guest_identity(self, pod: PodRecord) -> None:
        return None

    async def sweep(self, pods: list[PodRecord]) -> None:
        pass

    async def close(self) -> None:
        pass


class FakeNetwork:
    def __init__(self, steps: Steps, run_dir: Path) -> None:
        self.steps = steps
        self.run_dir = run_dir
        self.attached: set[str] = set()
        self.netns: set[str] = set()

    def netns_for(self, pod_id: str) -> str:
        return str(self.run_dir / "netns" / pod_id[:12])

    async def attach(self, pod: PodRecord) -> Attachment:
        self.netns.add(pod.netns)
        await self.steps.step("attach")
        self.attached.add(pod.id)
        return Attachment({"name": "fake", "plugins": []}, {"ips": []}, ("10.0.0.9",))

    async def detach(self, pod: PodRecord) -> None:
        await self.steps.step("detach")
        self.attached.discard(pod.id)

    async def remove_netns(self, pod: PodRecord) -> None:
        self.steps.calls.append("remove_netns")
        self.netns.discard(pod.netns)

    async def sweep(self, pods: list[PodRecord]) -> None:
        pass


class FakeRootfs:
    def __init__(self, steps: Steps) -> None:
        self.steps = steps
        self.mounted: set[Path] = set()
        self.writable: dict[Path, Path] = {}  # container dir -> where upper/work went
        self.unmounted_writable: list[Path] = []
        self.userns: dict[Path, tuple[Any, bool]] = {}  # container dir -> (userns, searchable)

    async def mount(
        self,
        layer_dirs: list[Path],
        container_dir: Path,
        writable_dir: Path,
        userns: Any = None,
        searchable: bool = True,
    ) -> Path:
        await self.steps.step("rootfs.mount")
        self.mounted.add(container_dir)
        self.writable[container_dir] = writable_dir
        self.userns[container_dir] = (userns, searchable)
        (container_dir / "rootfs").mkdir(parents=True, exist_ok=True)
        return container_dir / "rootfs"

    async def unmount(self, container_dir: Path, writable_dir: Path) -> None:
        self.steps.calls.append("rootfs.unmount")
        self.mounted.discard(container_dir)
        self.unmounted_writable.append(writable_dir)
        if writable_dir != container_dir:
            shutil.rmtree(writable_dir, ignore_errors=True)

    async def is_mounted(self, container_dir: Path) -> bool:
        return container_dir in self.mounted


class FakeScratch:
    """Per-pod scratch filesystems as plain dirs; ``limit_mib`` 0 is off, as in
    criv.sandbox.scratch.LoopScratch; ``made`` counts the filesystems made per pod."""

    def __init__(self, steps: Steps, limit_mib: int = 64) -> None:
        self.steps = steps
        self.limit_mib = limit_mib
        self.made: dict[Path, int] = {}

    async def prepare(self, pod_dir: Path, cid: str) -> Path | None:
        if self.limit_mib <= 0:
            return None
        await self.steps.step("scratch.prepare")
        if not (pod_dir / "scratch").is_dir():
            (pod_dir / "scratch").mkdir()
            self.made[pod_dir] = self.made.get(pod_dir, 0) + 1
        (pod_dir / "scratch" / cid).mkdir(exist_ok=True)
        return pod_dir / "scratch" / cid

    async def locate(self, pod_dir: Path, cid: str) -> Path | None:
        d = pod_dir / "scratch" / cid
        return d if d.is_dir() else None


@dataclass
class FakeImage:
    id: str = "sha256:" + "1" * 64
    repo_digests: tuple[str, ...] = ()
    layer_dirs: tuple[Path, ...] = (Path("/nonexistent/layer"),)
    config_json: bytes = b"{}"


@dataclass
class FakeImages:
    leases: set[str] = field(default_factory=set)

    def get(self, ref: str) -> FakeImage:
        return FakeImage()

    async def acquire(self, ref: str, holder: str) -> FakeImage:
        self.leases.add(holder)
        return FakeImage()

    async def release(self, holder: str) -> None:
        self.leases.discard(holder)

    async def release_many(self, holders: Iterable[str]) -> None:
        self.leases.difference_update(holders)

    def lease_holders(self) -> set[str]:
        return set(self.leases)
