"""Pod and container orchestration with fake collaborators (tests/unit/sandbox/fakes.py):
the order of steps, undo after each failing step, the hand-over of a pod whose caller
gave up, a lost agent or VM, a guest speaking for another pod, overlapping removals."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from criv.agent.types import AgentContainerInfo, AgentContainerState
from criv.config import Config
from criv.errors import Internal
from criv.sandbox.manager import SandboxManager
from criv.sandbox.records import MountRecord
from criv.sandbox.specs import ContainerSpec, PodSpec
from criv.sandbox.states import ContainerState, PodState
from criv.sandbox.userns import IdMapping, UserNs
from criv.state.runtime_state import RuntimeState
from tests.unit.sandbox.fakes import (
    FakeImages,
    FakeIsolation,
    FakeNetwork,
    FakeRootfs,
    FakeScratch,
    Steps,
)

# "prepare" and "attach" (CNI ADD) run together: their order between them is not fixed
POD_STEPS = ["prepare", "attach", "boot", "connect", "setup_sandbox"]


def in_pod_order(calls: list[str]) -> bool:
    return sorted(calls[:2]) == sorted(POD_STEPS[:2]) and calls[2:] == POD_STEPS[2:]


@dataclass
class Rig:
    mgr: SandboxManager
    steps: Steps
    vm: FakeIsolation
    host: FakeIsolation
    network: FakeNetwork
    rootfs: FakeRootfs
    scratch: FakeScratch
    images: FakeImages
    tmp: Path

    def spec(self, name: str = "p", handler: str = "") -> PodSpec:
        return PodSpec(name=name, namespace="ns", uid=f"uid-{name}", attempt=0, config=b"",
                       handler=handler, log_directory=str(self.tmp / "logs"))  # fmt: skip

    def ctr(self, name: str = "c") -> ContainerSpec:
        # no log path: a log follower would dial the fake's agent (not there)
        return ContainerSpec(name=name, attempt=0, config=b"", image="busybox",
                             mounts=(MountRecord("/data", str(self.tmp)),))  # fmt: skip


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    steps = Steps()
    cfg = Config(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"))
    vm = FakeIsolation(steps, "vm", containers_die_with_agent=True)
    host = FakeIsolation(steps, "host", containers_die_with_agent=False)
    network = FakeNetwork(steps, tmp_path / "run")
    rootfs = FakeRootfs(steps)
    scratch = FakeScratch(steps)
    images = FakeImages()
    mgr = SandboxManager(
        cfg, images, RuntimeState(tmp_path), {"vm": vm, "host": host}, network, rootfs, scratch
    )
    yield Rig(mgr, steps, vm, host, network, rootfs, scratch, images, tmp_path)


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_run_pod_steps_in_order_then_ready(rig: Rig) -> None:
    async def go() -> None:
        pod_id = await rig.mgr.run_pod(rig.spec())
        assert in_pod_order(rig.steps.calls), rig.steps.calls
        pod = rig.mgr.pod(pod_id[:8])
        assert pod.state is PodState.READY and pod.network_ready and pod.ips == ("10.0.0.9",)
        assert pod.isolation_state is not None and pod.isolation == "vm"
        await rig.mgr.remove_pod(pod_id)
        assert rig.mgr.pods.all() == [] and not rig.network.attached and not rig.network.netns
        await rig.mgr.close()

    run(go())


@pytest.mark.parametrize("failing", POD_STEPS)
def test_a_failing_step_undoes_every_step_before_it(rig: Rig, failing: str) -> None:
    async def go() -> None:
        rig.steps.fail.add(failing)
        with pytest.raises(Internal, match=failing):
            await rig.mgr.run_pod(rig.spec())
        assert rig.mgr.pods.all() == []
        assert not rig.network.attached, "CNI DEL after a failed RunPodSandbox"
        assert not rig.network.netns
        assert not rig.vm.booted and not rig.vm.prepared
        assert list((rig.tmp / "state" / "sandboxes").iterdir()) == []
        assert "destroy" in rig.steps.calls  # prepare ran alongside CNI ADD in any case
        # the name is free again: a retry boots a new pod
        rig.steps.fail.clear()
        pod_id = await rig.mgr.run_pod(rig.spec())
        assert rig.mgr.pod(pod_id).state is PodState.READY
        await rig.mgr.remove_pod(pod_id)
        await rig.mgr.close()

    run(go())


@pytest.mark.parametrize(("failing", "slow"), [("attach", "prepare"), ("prepare", "attach")])
def test_cni_add_and_prepare_both_finish_before_the_undo(rig: Rig, failing: str, slow: str) -> None:
    async def go() -> None:
        gate = asyncio.Event()
        rig.steps.fail.add(failing)
        rig.steps.block[slow] = gate
        run_pod = asyncio.create_task(rig.mgr.run_pod(rig.spec()))
        await asyncio.sleep(0.02)
        assert not run_pod.done() and "destroy" not in rig.steps.calls, "undo waits"
        assert sorted(rig.steps.calls) == ["attach", "prepare"]
        gate.set()
        with pytest.raises(Internal, match=failing):
            await run_pod
        assert "boot" not in rig.steps.calls and "destroy" in rig.steps.calls
        assert not rig.vm.prepared, "what prepare made is undone"
        assert not rig.network.attached and not rig.network.netns, "and CNI ADD too"
        assert rig.mgr.pods.all() == []
        await rig.mgr.close()

    run(go())


def test_a_caller_that_gave_up_hands_the_pod_to_its_retry(rig: Rig) -> None:
    async def go() -> None:
        gate = asyncio.Event()
        rig.steps.block["boot"] = gate
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(rig.mgr.run_pod(rig.spec()), 0.05)
        # still coming up: a retry now joins it instead of booting a second VM
        retry = asyncio.create_task(rig.mgr.run_pod(rig.spec()))
        await asyncio.sleep(0.01)
        gate.set()
        pod_id = await retry
        assert rig.steps.count("boot") == 1 and len(rig.mgr.pods.all()) == 1
        # a caller gives up again, the pod comes up after: the next retry gets it
        gate.clear()
        spec2 = rig.spec("q")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(rig.mgr.run_pod(spec2), 0.05)
        gate.set()
        for _ in range(50):
            if len([p for p in rig.mgr.pods.all() if p.state is PodState.READY]) == 2:
                break
            await asyncio.sleep(0.01)
        q_id = await rig.mgr.run_pod(spec2)
        assert rig.steps.count("boot") == 2 and rig.mgr.pod(q_id).name == "q"
        for p in (pod_id, q_id):
            await rig.mgr.remove_pod(p)
        await rig.mgr.close()

    run(go())


@pytest.mark.parametrize(
    "failing", ["scratch.prepare", "rootfs.mount", "share.m0", "share.rootfs", "agent.create"]
)
def test_a_failing_create_container_step_is_undone(rig: Rig, failing: str) -> None:
    async def go() -> None:
        pod_id = await rig.mgr.run_pod(rig.spec())
        rig.steps.fail.add(failing)
        with pytest.raises(Internal):
            await rig.mgr.create_container(pod_id, rig.ctr())
        assert rig.mgr.containers.all() == [] and not rig.images.leases
        assert not rig.rootfs.mounted
        scratch = rig.mgr.paths(pod_id).state / "scratch"
        assert not scratch.exists() or list(scratch.iterdir()) == [], "writable layer left"
        rig.steps.fail.clear()
        cid = await rig.mgr.create_container(pod_id, rig.ctr())  # the name is free again
        assert rig.mgr.container(cid).state is ContainerState.CREATED
        await rig.mgr.remove_pod(pod_id)
        assert not rig.images.leases and not rig.rootfs.mounted
        await rig.mgr.close()

    run(go())


def test_a_pods_scratch_is_made_at_its_first_container_and_holds_each_layer(rig: Rig) -> None:
    async def go() -> None:
        pod_id = await rig.mgr.run_pod(rig.spec())
        pod_dir = rig.mgr.paths(pod_id).state
        assert "scratch.prepare" not in rig.steps.calls, "pod start pays for no scratch fs"
        a = await rig.mgr.create_container(pod_id, rig.ctr("a"))
        b = await rig.mgr.create_container(pod_id, rig.ctr("b"))
        assert rig.scratch.made == {pod_dir: 1}
        # the steps in order: the writable layer's place, then the overlay over it
        i = rig.steps.calls.index("scratch.prepare")
        assert rig.steps.calls[i + 1] == "rootfs.mount"
        cdir = rig.mgr.ctx.container_dir
        assert rig.rootfs.writable[cdir(pod_id, a)] == pod_dir / "scratch" / a
        assert rig.rootfs.writable[cdir(pod_id, b)] == pod_dir / "scratch" / b
        await rig.mgr.remove_container(a)
        assert rig.rootfs.unmounted_writable == [pod_dir / "scratch" / a]
        assert not (pod_dir / "scratch" / a).exists() and (pod_dir / "scratch" / b).is_dir()
        await rig.mgr.remove_pod(pod_id)
        assert rig.rootfs.unmounted_writable[1:] == [pod_dir / "scratch" / b]
        assert not pod_dir.exists()
        await rig.mgr.close()

    run(go())


def test_layers_made_with_the_limit_off_are_found_after_it_is_turned_on(rig: Rig) -> None:
    async def go() -> None:
        rig.scratch.limit_mib = 0  # off: upper/work beside the rootfs, as before
        pod_id = await rig.mgr.run_pod(rig.spec())
        old = await rig.mgr.create_container(pod_id, rig.ctr("old"))
        old_dir = rig.mgr.ctx.container_dir(pod_id, old)
        assert rig.rootfs.writable[old_dir] == old_dir and not rig.scratch.made
        rig.scratch.limit_mib = 64  # as if criv restarted with a limit
        new = await rig.mgr.create_container(pod_id, rig.ctr("new"))
        scratch = rig.mgr.paths(pod_id).state / "scratch"
        assert rig.rootfs.writable[rig.mgr.ctx.container_dir(pod_id, new)] == scratch / new
        await rig.mgr.remove_pod(pod_id)
        assert sorted(rig.rootfs.unmounted_writable) == sorted([old_dir, scratch / new])
        await rig.mgr.close()

    run(go())


def test_a_user_namespace_idmaps_the_rootfs_in_both_modes_searchable_on_host_only(
    rig: Rig,
) -> None:
    """vm and host pods alike get their overlay on idmapped layers; only crun on the host
    opens the rootfs by its host path, so only there its parents become searchable (a
    vm pod's state dir stays 0700: its guest reaches the rootfs through the share)."""
    ns = UserNs(uids=(IdMapping(0, 1 << 20, 65536),), gids=(IdMapping(0, 1 << 20, 65536),))

    async def go() -> None:
        got = {}
        for handler in ("vm", "host"):
            spec = dataclasses.replace(rig.spec(name=handler, handler=handler), userns=ns)
            pod_id = await rig.mgr.run_pod(spec)
            cid = await rig.mgr.create_container(pod_id, dataclasses.replace(rig.ctr(), userns=ns))
            got[handler] = rig.rootfs.userns[rig.mgr.ctx.container_dir(pod_id, cid)]
            await rig.mgr.remove_pod(pod_id)
        assert got == {"vm": (ns, False), "host": (ns, True)}
        await rig.mgr.close()

    run(go())


async def _pod_with_running_container(rig: Rig, handler: str = "") -> tuple[str, str]:
    pod_id = await rig.mgr.run_pod(rig.spec(handler=handler or "vm"))
    cid = await rig.mgr.create_container(pod_id, rig.ctr())
    await rig.mgr.start_container(cid)
    assert rig.mgr.container(cid).state is ContainerState.RUNNING
    return pod_id, cid


async def _until(cond: object, what: str) -> None:
    for _ in range(200):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_lost_vm_ends_its_containers_and_the_pod(rig: Rig) -> None:
    async def go() -> None:
        pod_id, cid = await _pod_with_running_container(rig)
        rig.vm.dead.add(pod_id)
        rig.vm.agents[pod_id].end_events()
        await _until(lambda: rig.mgr.pod(pod_id).state is PodState.NOTREADY, "NOTREADY")
        c = rig.mgr.container(cid)
        assert (c.state, c.reason, c.exit_code) == (ContainerState.EXITED, "VMExited", 137)
        await rig.mgr.remove_pod(pod_id)
        await rig.mgr.close()

    run(go())


def test_a_lost_host_agent_leaves_running_containers_unknown(rig: Rig) -> None:
    async def go() -> None:
        pod_id, cid = await _pod_with_running_container(rig, handler="host")
        rig.host.dead.add(pod_id)
        rig.host.agents[pod_id].end_events()
        await _until(lambda: rig.mgr.container(cid).state is ContainerState.UNKNOWN, "UNKNOWN")
        assert rig.mgr.container(cid).reason == "AgentGone"
        await rig.mgr.remove_pod(pod_id)
        await rig.mgr.close()

    run(go())


def test_an_agent_cannot_speak_for_another_pods_container(rig: Rig) -> None:
    async def go() -> None:
        a, _ = await _pod_with_running_container(rig)
        b = await rig.mgr.run_pod(rig.spec("other"))
        victim = await rig.mgr.create_container(b, rig.ctr("v"))
        await rig.mgr.start_container(victim)
        forged = AgentContainerInfo(victim, AgentContainerState.EXITED, exit_code=99)
        rig.vm.agents[a].emit(victim, forged)
        # and one for its own container, to know the forged one was processed first
        mine = rig.mgr.containers_of(a)[0].id
        rig.vm.agents[a].containers[mine] = AgentContainerInfo(
            mine, AgentContainerState.EXITED, exit_code=3, finished_at_ns=7
        )
        rig.vm.agents[a].emit(mine, rig.vm.agents[a].containers[mine])
        await _until(lambda: rig.mgr.container(mine).state is ContainerState.EXITED, "own")
        v = rig.mgr.container(victim)
        assert v.state is ContainerState.RUNNING and v.exit_code == 0
        for p in (a, b):
            await rig.mgr.remove_pod(p)
        await rig.mgr.close()

    run(go())


def test_overlapping_stop_and_remove_calls_each_clean_up_once(rig: Rig) -> None:
    async def go() -> None:
        pod_id, cid = await _pod_with_running_container(rig)
        cid2 = await rig.mgr.create_container(pod_id, rig.ctr("d"))
        await asyncio.gather(
            rig.mgr.stop_pod(pod_id),
            rig.mgr.remove_container(cid),
            rig.mgr.remove_container(cid2),
            rig.mgr.remove_pod(pod_id),
            rig.mgr.stop_container(cid, 0),
            rig.mgr.remove_pod(pod_id[:10]),
        )
        assert rig.mgr.pods.all() == [] and rig.mgr.containers.all() == []
        assert rig.steps.count("rootfs.unmount") == 2  # once per container, never twice
        assert rig.steps.count("detach") == 1
        assert not rig.images.leases and not rig.rootfs.mounted and not rig.network.netns
        assert len(rig.mgr.ctx.locks) == 0
        # idempotent afterwards
        await rig.mgr.stop_pod(pod_id)
        await rig.mgr.remove_container(cid)
        await rig.mgr.close()

    run(go())


def test_a_stopped_pod_keeps_what_its_isolation_forgets_only_at_removal(rig: Rig) -> None:
    # a vm pod on a spare VM keeps its console log in the spare's directory while stopped
    async def go() -> None:
        pod_id, _ = await _pod_with_running_container(rig)
        await rig.mgr.stop_pod(pod_id)
        assert "destroy" in rig.steps.calls
        assert "forget" not in rig.steps.calls
        await rig.mgr.remove_pod(pod_id)
        assert rig.steps.count("forget") == 1
        await rig.mgr.close()

    run(go())


def test_container_stats_give_a_cpu_rate_from_two_samples(rig: Rig) -> None:
    async def go() -> None:
        pod_id, cid = await _pod_with_running_container(rig)
        first = await rig.mgr.container_stats([cid])
        assert first[cid].nano_cores is None
        await rig.mgr.remove_pod(pod_id)
        await rig.mgr.close()

    run(go())
