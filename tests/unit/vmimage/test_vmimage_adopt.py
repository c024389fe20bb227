"""Taking a vm-image pod back after a criv restart (criv/sandbox/vmimage/adopt.py and the
isolation's alive/connect/close), with libvirt faked: its record against the domain that
runs. A running VM is taken back (console followed on, VM watched, its end recorded);
one that stopped while criv was down is EXITED VMGone with the rest of its console; a
record that is missing, corrupt or does not account for the domain is AgentError (the
recovery then destroys the VM and marks the pod NOTREADY), never a crash."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from criv.agent.types import AgentContainerState, AgentEventKind
from criv.config import Config
from criv.errors import AgentError
from criv.hypervisor.domaininfo import DomainInfo
from criv.hypervisor.spec import domain_name
from criv.sandbox.isolation import PodPaths
from criv.sandbox.records import PodRecord
from criv.sandbox.states import PodState
from criv.sandbox.vm.host import VmHost
from criv.sandbox.vmimage import record
from criv.sandbox.vmimage.adopt import Plan, Untrusted, plan
from criv.sandbox.vmimage.agent import VmImageAgent
from criv.sandbox.vmimage.boxstate import BoxState
from criv.sandbox.vmimage.isolation import VmImageIsolation
from criv.sandbox.vmimage.record import AgentRecord, BoxRecord, ConsoleMark
from criv.state.runtime_state import RuntimeState
from criv.vmimage.sshkeys import generate_host_key

pytestmark = pytest.mark.timeout(30)

POD = "ab" * 32
CID = "cd" * 32
OWNER = "/var/lib/criv#vm-image"
UUID = "6f1c2b9e-0d4e-4f8a-9c3b-1e2d3c4b5a69"
KEY = generate_host_key()


class FakeVms:
    """Machines as adoption uses them: one domain (or none) under the pod's name."""

    domain_owner = OWNER

    def __init__(self, domain: DomainInfo | None) -> None:
        self.domain = domain
        self.destroyed = 0
        self.stop = asyncio.Event()
        self.why = "shutdown"

    async def lookup(self, pod: PodRecord) -> DomainInfo | None:
        return self.domain

    async def destroy(self, pod: PodRecord) -> None:
        self.destroyed += 1
        self.domain = None

    async def wait_stopped(self, pod: PodRecord) -> str:
        await self.stop.wait()
        return self.why


def _domain(uuid: str = UUID, owner: str = OWNER, state: str = "running") -> DomainInfo:
    return DomainInfo(domain_name(POD), uuid, state, POD, owner)


def _pod() -> PodRecord:
    return PodRecord(
        id=POD, name="web", namespace="default", uid="u", attempt=0, state=PodState.READY,
        created_at_ns=1, handler="vm-image", isolation="vm-image", config=b"",
        cni_result={"ips": [{"address": "10.88.0.7/16"}]},
    )  # fmt: skip


def _box(state: BoxState = BoxState.RUNNING, **kw: object) -> BoxRecord:
    b = BoxRecord(
        cid=CID, state=state, base="f" * 32 + ".qcow2", disk_name="d.qcow2", user="root",
        created_at_ns=1, started_at_ns=2 if state is not BoxState.CREATED else 0,
        domain_uuid=UUID if state is not BoxState.CREATED else "", pin=KEY.pin,
    )  # fmt: skip
    return replace(b, **kw)  # type: ignore[arg-type]


class Pod:
    """A pod's state dir as the last criv left it: the record and the console files."""

    def __init__(self, tmp: Path) -> None:
        self.paths = PodPaths(tmp / "state" / "sandboxes" / POD, tmp / "run" / "p" / POD[:12])
        self.root = tmp / "state" / "vmimage"
        self.dir = self.paths.state / "vmimage" / CID[:12]
        self.dir.mkdir(parents=True)
        self.console = self.dir / "console.log"
        self.cri = self.dir / "serial.log"

    def record(self, box: BoxRecord | None, copied: bytes = b"") -> None:
        """The record, with the console's first ``copied`` bytes in the CRI log."""
        self.console.write_bytes(copied)
        mark = ConsoleMark()
        if copied:
            from criv.sandbox.vmimage.crilog import CriConsoleFile

            f = CriConsoleFile(self.cri)
            f.write(copied)
            mark = ConsoleMark(len(copied) - f.pending, f.size)
            f.detach()
        if box is not None:
            box = replace(box, mark=mark)
        record.write(record.record_path(self.paths.state), AgentRecord(POD, box))

    def lines(self) -> list[str]:
        return [ln.split(" ", 3)[3] for ln in self.cri.read_text().splitlines()]

    def agent(self, vms: FakeVms) -> VmImageAgent:
        return VmImageAgent(_pod(), self.paths.state, self.root, vms)  # type: ignore[arg-type]

    def read(self) -> AgentRecord:
        return record.read(record.record_path(self.paths.state), POD)


async def test_a_running_vm_is_taken_back(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    pod.record(_box(BoxState.STOPPING), b"boot\nready\nhal")
    vms = FakeVms(_domain())
    agent = pod.agent(vms)
    assert await agent.adopt(pod.read(), OWNER) is Plan.ADOPT
    (info,) = await agent.list_containers()
    assert info.state is AgentContainerState.RUNNING  # a cut-short stop: kubelet retries it
    box = agent.keeper.box
    assert box is not None and box.state is BoxState.RUNNING
    assert box.overlay == pod.root / "pods" / POD[:32] / f"overlay-{CID[:12]}.qcow2"
    assert box.base.path == pod.root / "bases" / ("f" * 32 + ".qcow2")
    assert box.console is not None and box.console.pin == KEY.pin and box.console.pinned.is_set()
    assert agent.log_source(CID) is box.console
    with pod.console.open("ab") as f:
        f.write(b"f\nafter\n")  # written while criv was down, then more
    events = agent.keeper.subscribe()
    for _ in range(50):
        if pod.lines() == ["boot", "ready", "half", "after"]:
            break
        await asyncio.sleep(0.1)
    assert pod.lines() == ["boot", "ready", "half", "after"]
    assert pod.read().container.state is BoxState.RUNNING  # type: ignore[union-attr]
    vms.stop.set()  # the guest powers off
    ev = await asyncio.wait_for(events.get(), 5)
    assert ev is not None and ev.kind is AgentEventKind.EXITED
    assert (ev.info.exit_code, ev.info.reason) == (0, "Completed")  # type: ignore[union-attr]
    rec = pod.read().container
    assert rec is not None and (rec.state, rec.exit_code, rec.reason) == (
        BoxState.EXITED, 0, "Completed")  # fmt: skip
    assert agent.commit_source(CID) is box  # its disk can be committed


async def test_a_vm_gone_while_criv_was_down_exits(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    pod.record(_box(), b"boot\n")
    with pod.console.open("ab") as f:
        f.write(b"last words\npower")
    agent = pod.agent(FakeVms(None))
    assert await agent.adopt(pod.read(), OWNER) is Plan.GONE
    (info,) = await agent.list_containers()
    assert (info.state, info.exit_code, info.reason) == (AgentContainerState.EXITED, 255, "VMGone")
    assert "while criv was not running" in info.message and "last words" in info.message
    assert pod.lines() == ["boot", "last words", "power"]  # the rest, and the log ends
    assert agent.log_source(CID).complete  # type: ignore[union-attr]
    rec = pod.read().container
    assert rec is not None and (rec.state, rec.reason) == (BoxState.EXITED, "VMGone")


async def test_kept_as_recorded_and_a_cut_short_start(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    pod.record(_box(BoxState.EXITED, exit_code=137, reason="Killed", finished_at_ns=3), b"x\n")
    agent = pod.agent(FakeVms(None))
    assert await agent.adopt(pod.read(), OWNER) is Plan.KEEP
    (info,) = await agent.list_containers()
    assert (info.state, info.exit_code) == (AgentContainerState.EXITED, 137)
    assert agent.log_source(CID).complete  # type: ignore[union-attr]

    pod.record(_box(BoxState.CREATED), b"seabios\n")  # criv died inside StartContainer
    vms = FakeVms(_domain())
    agent = pod.agent(vms)
    assert await agent.adopt(pod.read(), OWNER) is Plan.CUT_SHORT
    assert vms.destroyed == 1 and not pod.console.exists() and not pod.cri.exists()
    (info,) = await agent.list_containers()
    assert info.state is AgentContainerState.CREATED

    pod.record(None)
    agent = pod.agent(FakeVms(None))
    assert await agent.adopt(pod.read(), OWNER) is Plan.EMPTY
    assert await agent.list_containers() == []


@pytest.mark.parametrize(
    ("box", "domain", "why"),
    [
        (_box(), _domain(uuid="00000000-0000-4000-8000-000000000000"), "not container"),
        (_box(), _domain(owner="/other#vm-image"), "not this criv's"),
        (None, _domain(), "names no container"),
        (_box(BoxState.EXITED), _domain(), "exited"),
    ],
)
async def test_what_the_record_does_not_account_for_is_untrusted(
    tmp_path: Path, box: BoxRecord | None, domain: DomainInfo, why: str
) -> None:
    pod = Pod(tmp_path)
    pod.record(box)
    with pytest.raises(Untrusted, match=why):
        await pod.agent(FakeVms(domain)).adopt(pod.read(), OWNER)


def test_the_plan_table() -> None:
    rec = AgentRecord(POD, _box())
    assert plan(rec, _domain(), OWNER) == (Plan.ADOPT, "")
    assert plan(rec, None, OWNER) == (Plan.GONE, "")
    assert plan(AgentRecord(POD, _box(BoxState.STOPPING)), None, OWNER)[0] is Plan.GONE
    assert plan(AgentRecord(POD), None, OWNER) == (Plan.EMPTY, "")
    assert plan(AgentRecord(POD, _box(BoxState.CREATED)), None, OWNER)[0] is Plan.KEEP


def _iso(tmp_path: Path, vms: FakeVms) -> VmImageIsolation:
    cfg = Config(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"))
    iso = VmImageIsolation(cfg, VmHost(cfg, RuntimeState(tmp_path)))
    iso._vms = vms  # type: ignore[assignment]
    return iso


async def test_the_isolation_takes_pods_back_or_refuses(tmp_path: Path) -> None:
    pod = Pod(tmp_path)
    vms = FakeVms(_domain())
    iso = _iso(tmp_path, vms)
    # a restarted criv: no record is an agent that cannot be had (never another error)
    assert await iso.alive(_pod())
    with pytest.raises(AgentError, match="no record"):
        await iso.connect(_pod(), pod.paths, 10)
    for junk in (b"{", b'{"version": 9, "kind": "vm-image-agent", "data": {}}'):
        record.record_path(pod.paths.state).write_bytes(junk)
        with pytest.raises(AgentError, match="not taken back"):
            await iso.connect(_pod(), pod.paths, 10)
    pod.record(_box(), b"boot\n")
    shutil.rmtree(pod.dir)  # its files gone: refused too, not a crash
    with pytest.raises(AgentError, match="not taken back"):
        await iso.connect(_pod(), pod.paths, 10)
    assert vms.destroyed == 0  # recovery destroys it (stop_agent), not connect

    pod = Pod(tmp_path)
    pod.record(_box(), b"boot\nhal")
    agent = await iso.connect(_pod(), pod.paths, 10)
    assert isinstance(agent, VmImageAgent) and await iso.alive(_pod())
    assert await iso.connect(_pod(), pod.paths, 10) is agent
    assert pod.paths.data_socket.exists()
    # criv stops: the VM runs on, the record keeps where the console's copy stopped
    with pod.console.open("ab") as f:
        f.write(b"f\nmore\n")
    await asyncio.sleep(0.5)
    await iso.close()
    rec = pod.read().container
    assert rec is not None and rec.state is BoxState.RUNNING
    assert rec.mark == ConsoleMark(pod.console.stat().st_size, pod.cri.stat().st_size)
    assert pod.lines() == ["boot", "half", "more"] and vms.destroyed == 0
    # a pod this criv saw go is not alive, and its record is gone
    iso = _iso(tmp_path, vms)
    agent = await iso.connect(_pod(), pod.paths, 10)
    assert isinstance(agent, VmImageAgent)
    await iso.destroy(_pod(), pod.paths)
    assert not await iso.alive(_pod()) and vms.destroyed == 1
    assert not record.record_path(pod.paths.state).exists()
    await agent.keeper.save()  # a late save (an exit being recorded) writes nothing
    assert not record.record_path(pod.paths.state).exists()
