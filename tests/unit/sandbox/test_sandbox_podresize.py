"""UpdatePodSandboxResources on a vm pod, without a VM: the vCPUs and balloon targets asked
of the hypervisor, refusals before anything changes, a hot-plug that fails part-way recorded
as it is, and a balloon the guest does not follow put back."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from criv.config import Config
from criv.errors import CrivError, Internal
from criv.sandbox import podresources
from criv.sandbox.isostate import VmState
from criv.sandbox.records import PodRecord
from criv.sandbox.states import PodState
from criv_agent.api.runtime.v1 import api_pb2

MIB = 1 << 20


class Hotplug:
    def __init__(self, live: int, fail_at: int = 0) -> None:
        self.live = live
        self.fail_at = fail_at  # plug up to this many, then fail
        self.asked: list[int] = []

    async def vcpus(self, pod: PodRecord) -> tuple[int, int]:
        return self.live, 4

    async def set_vcpus(self, pod: PodRecord, count: int) -> int:
        self.asked.append(count)
        if self.fail_at:
            self.live = self.fail_at
            raise Internal("libvirt said no")
        self.live = count
        return count


class Balloon(Hotplug):
    """Hotplug plus a balloon; the guest follows it up to ``gives_back_to`` MiB at least."""

    def __init__(self, live: int, mib: int, gives_back_to: int = 0, uses: int = 100) -> None:
        super().__init__(live)
        self.mib = mib
        self.target = mib
        self.floor = gives_back_to
        self.uses = uses  # what the guest says it uses
        self.targets: list[int] = []

    async def memory_use(self, pod: PodRecord) -> tuple[int, int]:
        return self.mib, self.uses

    async def memory(self, pod: PodRecord) -> int:
        self.mib = max(self.target, self.floor)
        return self.mib

    async def set_memory(self, pod: PodRecord, mib: int) -> None:
        self.targets.append(mib)
        self.target = mib


class Pods:
    def __init__(self, pod: PodRecord) -> None:
        self.pod = pod

    async def update(self, pod_id: str, fn: Callable[[PodRecord], PodRecord]) -> PodRecord:
        self.pod = fn(self.pod)
        return self.pod


class Locks:
    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        yield


class Ctx:
    def __init__(self, pod: PodRecord, iso: Hotplug) -> None:
        self.config = Config()
        self.pods = Pods(pod)
        self.locks = Locks()
        self.iso = iso

    def pod(self, pod_id: str) -> PodRecord:
        return self.pods.pod

    def isolation(self, pod: PodRecord) -> Hotplug:
        return self.iso


def _pod(vcpus: int = 1, memory_mib: int = 256, max_memory_mib: int = 0) -> PodRecord:
    st = VmState(
        domain="criv-x", vcpus=vcpus, max_vcpus=4, memory_mib=memory_mib,
        max_memory_mib=max_memory_mib,
    )  # fmt: skip
    return PodRecord(
        id="ab" * 32, name="p", namespace="n", uid="u", attempt=0, state=PodState.READY,
        created_at_ns=1, handler="", isolation="vm", config=b"", isolation_state=st,
    )  # fmt: skip


def _update(ctx: Ctx, cpus: float = 0, memory_mib: int = 0) -> None:
    res = api_pb2.LinuxContainerResources(
        cpu_period=100_000 if cpus else 0,
        cpu_quota=int(cpus * 100_000),
        memory_limit_in_bytes=memory_mib * MIB,
    )
    c: Any = ctx
    asyncio.run(podresources.update_pod_resources(c, "ab" * 32, res, res.__class__()))


@pytest.fixture(autouse=True)
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(podresources.os, "cpu_count", lambda: 8)


def _state(ctx: Ctx) -> VmState:
    st = ctx.pods.pod.isolation_state
    assert isinstance(st, VmState)
    return st


@pytest.mark.timeout(10)
def test_more_vcpus_are_plugged_and_recorded() -> None:
    ctx = Ctx(_pod(), Hotplug(1))
    _update(ctx, cpus=2.5)
    assert ctx.iso.asked == [3]
    assert _state(ctx).vcpus == 3
    assert ctx.pods.pod.resources == {"cpu_period": 100_000, "cpu_quota": 250_000}
    _update(ctx, cpus=2.5)  # same size: nothing asked
    assert ctx.iso.asked == [3]


@pytest.mark.parametrize(
    ("cpus", "memory_mib", "field"),
    [
        (2, 1024, "memory_limit_in_bytes"),  # memory above the most (and vCPUs): nothing done
        (6, 0, "at most 4"),  # beyond the VM's slots
        (0.5, 0, "from 2 to 1 vCPUs"),  # an unplug
    ],
)
@pytest.mark.timeout(10)
def test_refusals_change_nothing(cpus: float, memory_mib: int, field: str) -> None:
    ctx = Ctx(_pod(vcpus=2), Hotplug(2))
    before = ctx.pods.pod
    with pytest.raises(CrivError) as e:
        _update(ctx, cpus=cpus, memory_mib=memory_mib)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert field in e.value.message and e.value.message.startswith("pod abababababab (vm): ")
    assert ctx.iso.asked == [] and ctx.pods.pod == before


@pytest.mark.timeout(10)
def test_a_hotplug_failing_part_way_records_what_the_vm_has() -> None:
    ctx = Ctx(_pod(), Hotplug(1, fail_at=2))
    before = ctx.pods.pod.resources
    with pytest.raises(CrivError) as e:
        _update(ctx, cpus=3)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "from 1 to 3 vCPUs" in e.value.message and "has 2 vCPUs now" in e.value.message
    assert _state(ctx).vcpus == 2  # what libvirt says the VM has
    assert ctx.pods.pod.resources == before  # the resize itself was not taken
    assert dataclasses.replace(_state(ctx), vcpus=1) == _pod().isolation_state


@pytest.mark.timeout(10)
def test_memory_moves_with_the_balloon_and_is_recorded() -> None:
    ctx = Ctx(_pod(memory_mib=672, max_memory_mib=1184), Balloon(1, 672))
    _update(ctx, memory_mib=256)  # 256 + the guest's own 160 = 416 MiB: the balloon inflates
    assert ctx.iso.targets == [416] and _state(ctx).memory_mib == 416
    _update(ctx, cpus=2, memory_mib=1024)  # up to the most, and a vCPU: both
    assert ctx.iso.targets == [416, 1184] and ctx.iso.asked == [2]
    assert (_state(ctx).memory_mib, _state(ctx).vcpus) == (1184, 2)
    assert ctx.pods.pod.resources["memory_limit_bytes"] == 1024 * MIB


@pytest.mark.timeout(10)
def test_a_balloon_the_guest_does_not_follow_is_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(podresources, "BALLOON_WAIT_SECONDS", 0.3)
    ctx = Ctx(_pod(memory_mib=672, max_memory_mib=672), Balloon(1, 672, gives_back_to=500))
    before = ctx.pods.pod
    with pytest.raises(CrivError) as e:
        _update(ctx, cpus=2, memory_mib=256)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "got only to 500 MiB of 416 MiB" in e.value.message, e.value.message
    assert "back at 672 MiB" in e.value.message
    assert ctx.iso.targets == [416, 672]  # the old target put back
    assert ctx.iso.asked == []  # and no vCPU plugged after the failed step
    assert ctx.pods.pod == before


@pytest.mark.timeout(10)
def test_a_shrink_below_the_guests_use_is_refused_before_the_balloon_moves() -> None:
    ctx = Ctx(_pod(memory_mib=672, max_memory_mib=672), Balloon(1, 672, uses=400))
    before = ctx.pods.pod
    with pytest.raises(CrivError) as e:
        _update(ctx, cpus=2, memory_mib=256)  # 416 MiB < 400 used + 32 MiB headroom
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "the guest uses 400 MiB of its 672 MiB, so 416 MiB" in e.value.message
    assert ctx.iso.targets == [] and ctx.iso.asked == [] and ctx.pods.pod == before
    ctx.iso.uses = 300  # enough room now: taken
    _update(ctx, cpus=2, memory_mib=256)
    assert ctx.iso.targets == [416] and _state(ctx).memory_mib == 416
