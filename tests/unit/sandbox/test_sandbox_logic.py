"""Pure logic of the sandbox layer: state machines, filters, records, merging."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from criv.agent.types import AgentContainerInfo, AgentContainerState
from criv.errors import AlreadyExists, AmbiguousId, FailedPrecondition, NotFound
from criv.sandbox import events
from criv.sandbox.containers import host_log_path
from criv.sandbox.events import EventBus, EventKind
from criv.sandbox.isostate import HostState, VmImageState, VmState, start_kind
from criv.sandbox.locks import KeyedLocks
from criv.sandbox.names import NameIndex
from criv.sandbox.records import (
    CONTAINER_KIND,
    CONTAINER_VERSION,
    POD_KIND,
    POD_VERSION,
    ContainerRecord,
    MountRecord,
    PodRecord,
    PortMap,
    check_container_record,
    check_pod_record,
)
from criv.sandbox.rootfs import overlay_options
from criv.sandbox.specs import (
    ContainerFilter,
    PodFilter,
    PodSpec,
    labels_match,
    match_container,
    match_pod,
)
from criv.sandbox.states import ContainerState, PodState, check_container, check_pod
from criv.sandbox.store import Store
from criv.sandbox.transitions import merge_info
from criv.state.records import write_record


def pod(**kw: object) -> PodRecord:
    base: dict[str, object] = dict(
        id="abc123" + "0" * 58, name="p", namespace="ns", uid="u", attempt=0,
        state=PodState.READY, created_at_ns=1, handler="", isolation="host", config=b"\x01\x02",
        labels={"app": "web", "tier": "fe"},
    )  # fmt: skip
    base.update(kw)
    return PodRecord(**base)  # type: ignore[arg-type]


def ctr(**kw: object) -> ContainerRecord:
    base: dict[str, object] = dict(
        id="def456" + "0" * 58, sandbox_id="abc123" + "0" * 58, name="c", attempt=0,
        state=ContainerState.RUNNING, created_at_ns=1, config=b"cfg", image="busybox",
        image_id="sha256:1", image_ref="sha256:1", labels={"app": "web"},
    )  # fmt: skip
    base.update(kw)
    return ContainerRecord(**base)  # type: ignore[arg-type]


def info(state: AgentContainerState, **kw: object) -> AgentContainerInfo:
    return AgentContainerInfo(container_id="x", state=state, **kw)  # type: ignore[arg-type]


def test_pod_transitions() -> None:
    check_pod(PodState.PENDING, PodState.READY)
    check_pod(PodState.READY, PodState.NOTREADY)
    check_pod(PodState.NOTREADY, PodState.NOTREADY)
    with pytest.raises(FailedPrecondition):
        check_pod(PodState.NOTREADY, PodState.READY)
    with pytest.raises(FailedPrecondition):
        check_pod(PodState.READY, PodState.PENDING)


def test_container_transitions() -> None:
    check_container(ContainerState.CREATED, ContainerState.RUNNING)
    check_container(ContainerState.CREATED, ContainerState.EXITED)
    check_container(ContainerState.RUNNING, ContainerState.UNKNOWN)
    check_container(ContainerState.UNKNOWN, ContainerState.EXITED)
    for bad in (ContainerState.CREATED, ContainerState.RUNNING, ContainerState.UNKNOWN):
        with pytest.raises(FailedPrecondition):
            check_container(ContainerState.EXITED, bad)
    with pytest.raises(FailedPrecondition):
        check_container(ContainerState.RUNNING, ContainerState.CREATED)


def test_label_selector_and_filters() -> None:
    assert labels_match({}, {"a": "b"})
    assert labels_match({"app": "web"}, {"app": "web", "x": "y"})
    assert not labels_match({"app": "web"}, {"app": "db"})
    assert not labels_match({"missing": ""}, {"app": "web"})
    p = pod()
    assert match_pod(PodFilter(id="abc"), p)
    assert not match_pod(PodFilter(id="abd"), p)
    assert match_pod(PodFilter(state=PodState.READY, labels={"tier": "fe"}), p)
    assert not match_pod(PodFilter(state=PodState.NOTREADY), p)
    # a PENDING pod is NOTREADY as far as CRI knows
    assert match_pod(PodFilter(state=PodState.NOTREADY), pod(state=PodState.PENDING))
    c = ctr()
    assert match_container(ContainerFilter(pod_sandbox_id="abc1", state=ContainerState.RUNNING), c)
    assert not match_container(ContainerFilter(state=ContainerState.EXITED), c)
    assert not match_container(ContainerFilter(pod_sandbox_id="zzz"), c)
    assert not match_container(ContainerFilter(labels={"app": "db"}), c)
    assert match_container(ContainerFilter(id="def4"), c)


def test_records_round_trip() -> None:
    p = pod(port_mappings=(PortMap(8080, 80, "tcp", "127.0.0.1"),), ips=("10.0.0.2",),
            cni_result={"ips": []}, isolation_state=HostState(pid=5, start_time=7))  # fmt: skip
    assert PodRecord.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    v = pod(isolation="vm", isolation_state=VmState(domain="d", mac="aa:bb", mtu=1450, cid=9))
    assert PodRecord.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    assert PodRecord.from_dict(pod(isolation_state=None).to_dict()).isolation_state is None
    c = ctr(mounts=(MountRecord("/data", "/host", True, False, 2),), resources=b"\x00\xff")
    assert ContainerRecord.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    # unknown keys (from a newer minor writer) are ignored
    d = c.to_dict()
    d["future_field"] = 1
    assert ContainerRecord.from_dict(d) == c


def _ctr_store(tmp_path: Path) -> Store[ContainerRecord]:
    return Store(
        CONTAINER_KIND, CONTAINER_VERSION, lambda r: tmp_path / f"{r.id}.json",
        ContainerRecord.from_dict, check_container_record, "container",
    )  # fmt: skip


def test_store_update_persists_and_checks_transitions(tmp_path: Path) -> None:
    async def go() -> None:
        store = _ctr_store(tmp_path)
        c = await store.add(ctr())
        old, new = await store.update_pair(
            c.id, lambda r: r.__class__(**{**r.__dict__, "state": ContainerState.EXITED})
        )
        assert old.state is ContainerState.RUNNING and new.state is ContainerState.EXITED
        with pytest.raises(FailedPrecondition):
            await store.update(
                c.id, lambda r: r.__class__(**{**r.__dict__, "state": ContainerState.RUNNING})
            )
        assert store.must(c.id).state is ContainerState.EXITED  # the refused change not kept
        again = _ctr_store(tmp_path)
        assert again.load(tmp_path / f"{c.id}.json").state is ContainerState.EXITED
        assert again.resolve("def4") == c.id and again.resolve("") is None
        assert again.resolve("ffff") is None
        await again.delete(c.id)
        assert not (tmp_path / f"{c.id}.json").exists() and again.get(c.id) is None

    asyncio.run(go())


def test_store_uses_the_injected_checker(tmp_path: Path) -> None:
    seen: list[tuple[PodState, PodState]] = []

    def check(old: PodRecord, new: PodRecord) -> None:
        seen.append((old.state, new.state))
        check_pod_record(old, new)

    async def go() -> None:
        pods: Store[PodRecord] = Store(
            POD_KIND, POD_VERSION, lambda r: tmp_path / "p.json", PodRecord.from_dict,
            check, "pod sandbox",
        )  # fmt: skip
        p = await pods.add(pod(state=PodState.PENDING))
        await pods.update(p.id, lambda r: r)  # no change: no check, no write
        assert seen == []
        await pods.update(p.id, lambda r: r.__class__(**{**r.__dict__, "state": PodState.READY}))
        assert seen == [(PodState.PENDING, PodState.READY)]
        assert json.loads((tmp_path / "p.json").read_text())["data"]["state"] == "ready"

    asyncio.run(go())


def test_ambiguous_prefix_is_an_error_not_not_found(tmp_path: Path) -> None:
    async def go() -> None:
        store = _ctr_store(tmp_path)
        await store.add(ctr(id="aa11" + "0" * 60))
        await store.add(ctr(id="aa22" + "0" * 60))
        with pytest.raises(AmbiguousId, match="ambiguous"):
            store.resolve("aa")
        with pytest.raises(NotFound):
            store.find("bb")
        assert store.find("aa2").id.startswith("aa22")

    asyncio.run(go())


def test_v1_pod_record_with_a_free_form_isolation_state_still_reads(tmp_path: Path) -> None:
    d = pod(isolation="vm").to_dict()
    d["isolation_state"] = {"domain": "criv-x", "mac": "aa:bb", "mtu": 1400, "old_key": 1}
    write_record(tmp_path / "sandbox.json", POD_KIND, 1, d)
    pods: Store[PodRecord] = Store(
        POD_KIND, POD_VERSION, lambda r: tmp_path / "sandbox.json", PodRecord.from_dict,
        check_pod_record, "pod sandbox",
    )  # fmt: skip
    st = pods.load(tmp_path / "sandbox.json").isolation_state
    assert st == VmState(domain="criv-x", mac="aa:bb", mtu=1400)
    d["isolation_state"] = {}  # v1 before boot
    write_record(tmp_path / "sandbox.json", POD_KIND, 1, d)
    assert pods.load(tmp_path / "sandbox.json").isolation_state is None


def test_reserved_names_come_from_the_records() -> None:
    p = pod()
    spec = PodSpec(name=p.name, namespace=p.namespace, uid=p.uid, attempt=p.attempt, config=b"")
    assert spec.reserved_name == p.reserved_name == "p_ns_u_0"
    assert ctr(name="c", attempt=2).reserved_name(p) == p.container_reserved_name("c", 2)
    assert p.container_reserved_name("c", 2) == "c_p_ns_u_2"


def test_keyed_locks_serialize_per_key_and_go_when_unused() -> None:
    async def go() -> None:
        locks = KeyedLocks()
        order: list[str] = []

        async def hold(key: str, tag: str, pause: float) -> None:
            async with locks.hold(key):
                order.append(f"{tag}+")
                await asyncio.sleep(pause)
                order.append(f"{tag}-")

        await asyncio.gather(hold("a", "1", 0.02), hold("a", "2", 0), hold("b", "3", 0.01))
        # same key: one after the other; another key runs beside them
        assert order.index("1-") < order.index("2+")
        assert order.index("3+") < order.index("1-")
        assert len(locks) == 0

    asyncio.run(go())


def test_merge_info_trusts_only_legal_transitions() -> None:
    c = ctr(state=ContainerState.RUNNING, started_at_ns=5)
    assert merge_info(c, info(AgentContainerState.CREATED)).state is ContainerState.RUNNING
    done = merge_info(
        c, info(AgentContainerState.EXITED, exit_code=137, reason="OOMKilled", finished_at_ns=9)
    )
    assert (done.state, done.exit_code, done.reason, done.finished_at_ns, done.started_at_ns) == (
        ContainerState.EXITED, 137, "OOMKilled", 9, 5)  # fmt: skip
    # exited is final: a later, different story from the agent changes nothing
    assert merge_info(done, info(AgentContainerState.EXITED, exit_code=0)) is done
    # a running container does not carry a stale exit code
    assert merge_info(c, info(AgentContainerState.RUNNING, exit_code=3)).exit_code == 0


def test_names() -> None:
    n = NameIndex("container")
    n.reserve("a", "1")
    n.reserve("a", "1")  # the holder may re-reserve
    with pytest.raises(AlreadyExists, match="reserved for 1"):
        n.reserve("a", "2")
    n.release("a", "2")  # not the holder: no effect
    assert n.holder("a") == "1"
    n.release("a", "1")
    n.reserve("a", "2")


def test_host_log_path(tmp_path: Path) -> None:
    assert host_log_path("/var/log/pods/x", "c/0.log") == "/var/log/pods/x/c/0.log"
    assert host_log_path("", "c.log") == ""
    assert host_log_path("", "/abs/c.log") == ""
    assert host_log_path("/d", "") == ""
    # an absolute log path is joined under the log directory, as containerd does
    assert host_log_path("/d", "/abs/c.log") == "/d/abs/c.log"
    with pytest.raises(FailedPrecondition):
        host_log_path("/var/log/pods/x", "../../../etc/passwd")
    with pytest.raises(FailedPrecondition):
        host_log_path("/var/log/pods/x", "/../../etc/passwd")
    # a symlink in the directory that leads out of it is not followed
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "out").symlink_to("/etc")
    (logs / "in").symlink_to(logs)
    with pytest.raises(FailedPrecondition):
        host_log_path(str(logs), "out/passwd")
    assert host_log_path(str(logs), "in/c.log") == f"{logs}/in/c.log"


def test_overlay_options_topmost_first() -> None:
    opts = overlay_options(
        [Path("/l/base"), Path("/l/mid"), Path("/l/top")], Path("/u"), Path("/w")
    )
    assert opts == "lowerdir=/l/top:/l/mid:/l/base,upperdir=/u,workdir=/w"
    with pytest.raises(Exception, match="character"):
        overlay_options([Path("/l/a,b")], Path("/u"), Path("/w"))


def test_event_bus_fan_out_and_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "QUEUE_SIZE", 3)

    async def go() -> None:
        bus = EventBus()
        a: list[str] = []
        b: list[str] = []

        async def sub(into: list[str]) -> None:
            async for ev in bus.subscribe():
                into.append(ev.container_id)

        tasks = [asyncio.create_task(sub(a)), asyncio.create_task(sub(b))]
        await asyncio.sleep(0)
        bus.publish(EventKind.CREATED, "c0", "p")
        bus.publish(EventKind.STARTED, "c1", "p")
        await asyncio.sleep(0.01)
        assert a == b == ["c0", "c1"]  # every subscriber gets every event, in order
        # seven events while the subscribers cannot run: a queue of 3 keeps the newest
        for i in range(2, 9):
            bus.publish(EventKind.STOPPED, f"c{i}", "p")
        await asyncio.sleep(0.01)
        assert a == b == ["c0", "c1", "c6", "c7", "c8"]
        bus.close()
        await asyncio.gather(*tasks)

    asyncio.run(go())


def test_start_kind_is_template_only_for_a_cloned_vm() -> None:
    assert start_kind(VmState(template="k" * 16)) == "template"
    assert start_kind(VmState()) == "cold"
    assert start_kind(HostState(pid=1)) == "cold"
    assert start_kind(VmImageState(domain="d")) == "cold"
    assert start_kind(None) == "cold"
