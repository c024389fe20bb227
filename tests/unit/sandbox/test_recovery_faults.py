"""Recovery goes on item by item and quarantines what it cannot read; failed CNI DELs of
undone pods are kept and retried (fakes from tests/unit/sandbox/fakes.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from criv.config import Config
from criv.doctor import check_state
from criv.errors import Internal
from criv.sandbox import recovery
from criv.sandbox.cnidel import list_pending
from criv.sandbox.manager import SandboxManager
from criv.sandbox.quarantine import list_quarantined
from criv.sandbox.records import MountRecord
from criv.sandbox.specs import ContainerSpec, PodSpec
from criv.state.runtime_state import RuntimeState
from tests.unit.sandbox.fakes import (
    FakeImages,
    FakeIsolation,
    FakeNetwork,
    FakeRootfs,
    FakeScratch,
    Steps,
)


@dataclass
class Rig:
    tmp: Path
    cfg: Config
    steps: Steps
    iso: FakeIsolation
    network: FakeNetwork
    images: FakeImages

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def manager(self) -> SandboxManager:
        return SandboxManager(
            self.cfg, self.images, RuntimeState(self.tmp), {"vm": self.iso, "host": self.iso},
            self.network, FakeRootfs(self.steps), FakeScratch(self.steps),
        )  # fmt: skip

    def spec(self, name: str, host_network: bool = False) -> PodSpec:
        return PodSpec(name=name, namespace="ns", uid=f"uid-{name}", attempt=0, config=b"",
                       handler="host" if host_network else "", host_network=host_network,
                       log_directory=str(self.tmp / "logs"))  # fmt: skip

    def ctr(self, name: str) -> ContainerSpec:
        return ContainerSpec(name=name, attempt=0, config=b"", image="busybox",
                             mounts=(MountRecord("/data", str(self.tmp)),))  # fmt: skip


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    steps = Steps()
    cfg = Config(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"))
    yield Rig(
        tmp_path, cfg, steps, FakeIsolation(steps, "vm", containers_die_with_agent=True),
        FakeNetwork(steps, tmp_path / "run"), FakeImages(),
    )  # fmt: skip


def run(coro: Any) -> None:
    asyncio.run(coro)


async def _two_pods(rig: Rig) -> tuple[str, str, str]:
    """Pods a and b, b with a container; criv then stops (pods keep running)."""
    mgr = rig.manager()
    await mgr.start()
    a = await mgr.run_pod(rig.spec("a"))
    b = await mgr.run_pod(rig.spec("b"))
    cid = await mgr.create_container(b, rig.ctr("c"))
    await mgr.close()
    return a, b, cid


def test_an_unreadable_pod_record_is_quarantined_and_nothing_of_it_removed(rig: Rig) -> None:
    async def go() -> None:
        a, b, cid = await _two_pods(rig)
        pod_dir = rig.state / "sandboxes" / b
        (pod_dir / "sandbox.json").write_text("{not json")
        mgr = rig.manager()
        await mgr.start()
        assert [p.id for p in mgr.pods.all()] == [a]  # the other pod is back
        assert pod_dir.is_dir() and (pod_dir / "containers" / cid).is_dir()
        assert not (pod_dir / "sandbox.json").exists()
        (q,) = list_quarantined(rig.state)
        assert (q.kind, q.id, q.original) == ("pod", b, str(pod_dir / "sandbox.json"))
        assert Path(q.record).read_text() == "{not json"
        assert cid in rig.images.leases, "its container's lease (live overlay) is kept"
        assert b in rig.iso.booted, "its agent is not destroyed"
        (check,) = check_state(rig.cfg)
        assert check.level == "WARN" and b[:12] in check.name and "delete the note" in check.detail
        await mgr.close()
        # the next start keeps it as it is, without a second quarantine
        mgr = rig.manager()
        await mgr.start()
        assert pod_dir.is_dir() and len(list_quarantined(rig.state)) == 1
        await mgr.remove_pod(a)
        await mgr.close()

    run(go())


def test_an_unreadable_container_record_keeps_its_lease_and_dir(rig: Rig) -> None:
    async def go() -> None:
        _a, b, cid = await _two_pods(rig)
        cdir = rig.state / "sandboxes" / b / "containers" / cid
        rec = json.loads((cdir / "container.json").read_text())
        rec["version"] = 99  # a newer criv's record: never misread, never deleted
        (cdir / "container.json").write_text(json.dumps(rec))
        rig.images.leases.add("f" * 64)  # a lease whose container is really gone
        mgr = rig.manager()
        await mgr.start()
        assert cdir.is_dir() and mgr.pods.get(b) is not None
        assert mgr.containers.get(cid) is None
        assert cid in rig.images.leases and "f" * 64 not in rig.images.leases
        (q,) = list_quarantined(rig.state)
        assert (q.kind, q.pod_id) == ("container", b) and "version 99" in q.reason
        await mgr.close()

    run(go())


def test_a_failing_sweep_item_neither_stops_start_nor_deletes_under_a_mount(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    orphan = rig.state / "sandboxes" / ("e" * 64)
    stuck = orphan / "containers" / ("d" * 64) / "rootfs"

    async def umount_fails(path: Path) -> None:
        raise Internal(f"cannot unmount {path}: busy")

    monkeypatch.setattr(recovery, "umount_lazy", umount_fails)
    monkeypatch.setattr(
        recovery, "mounts_under", lambda p: [stuck] if str(stuck).startswith(str(p)) else []
    )

    async def sweep_fails(pods: list[Any]) -> None:
        raise OSError("netns dir unreadable")

    async def go() -> None:
        a, _b, _cid = await _two_pods(rig)
        stuck.mkdir(parents=True)
        (stuck / "precious").write_text("a volume's file")
        rig.network.sweep = sweep_fails  # type: ignore[method-assign]
        mgr = rig.manager()
        await mgr.start()  # does not raise
        assert (stuck / "precious").exists(), "nothing deleted under a mount still there"
        assert mgr.pods.get(a) is not None
        await mgr.close()

    run(go())


def test_a_failed_del_while_undoing_run_pod_is_kept_and_retried(rig: Rig) -> None:
    async def go() -> None:
        mgr = rig.manager()
        await mgr.start()
        rig.steps.fail |= {"boot", "detach"}
        with pytest.raises(Internal, match="boot"):
            await mgr.run_pod(rig.spec("x"))
        assert mgr.pods.all() == []
        (pending,) = list_pending(rig.state)
        assert pending.pod_id in rig.network.attached and pending.netns in rig.network.netns
        assert "detach" in pending.last_error
        (check,) = check_state(rig.cfg)
        assert check.level == "WARN" and "pending CNI DEL" in check.name
        # still failing: a stop of another pod (host network: no DEL of its own)
        # retries in the background and keeps it
        rig.steps.fail.discard("boot")
        ok = await mgr.run_pod(rig.spec("ok", host_network=True))
        await mgr.stop_pod(ok)
        await _settle(mgr)
        (again,) = list_pending(rig.state)
        assert again.attempts == 2
        # fixed: the next release retries and it is gone, netns too
        rig.steps.fail.clear()
        await mgr.remove_pod(ok)
        await _settle(mgr)
        assert list_pending(rig.state) == []
        assert not rig.network.attached and not rig.network.netns
        await mgr.close()

    run(go())


def test_a_pending_del_is_retried_at_start(rig: Rig) -> None:
    async def go() -> None:
        mgr = rig.manager()
        await mgr.start()
        rig.steps.fail |= {"connect", "detach"}
        with pytest.raises(Internal):
            await mgr.run_pod(rig.spec("x"))
        await mgr.close()
        assert len(list_pending(rig.state)) == 1
        rig.steps.fail.clear()
        mgr = rig.manager()
        await mgr.start()
        assert list_pending(rig.state) == [] and not rig.network.attached
        await mgr.close()

    run(go())


async def _settle(mgr: SandboxManager) -> None:
    """Wait for the background DEL retry a release kicked."""
    for _ in range(100):
        if not len(mgr.ctx.tasks):
            return
        await asyncio.sleep(0.01)
