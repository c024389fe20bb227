"""Pure logic of the sandbox layer: state machines, filters, records, merging."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from criv.agent.types import AgentContainerInfo, AgentContainerState
from criv.errors import AlreadyExists, FailedPrecondition
from criv.sandbox.containers import host_log_path
from criv.sandbox.core import merge_info
from criv.sandbox.events import EventBus, EventKind
from criv.sandbox.names import NameIndex
from criv.sandbox.records import (
    CONTAINER_KIND,
    POD_KIND,
    ContainerRecord,
    MountRecord,
    PodRecord,
    PortMap,
    Store,
)
from criv.sandbox.rootfs import overlay_options
from criv.sandbox.specs import ContainerFilter, PodFilter, labels_match, match_container, match_pod
from criv.sandbox.states import ContainerState, PodState, check_container, check_pod


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
            cni_result={"ips": []}, isolation_state={"pid": 5})  # fmt: skip
    assert PodRecord.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    c = ctr(mounts=(MountRecord("/data", "/host", True, False, 2),), resources=b"\x00\xff")
    assert ContainerRecord.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    # unknown keys (from a newer minor writer) are ignored
    d = c.to_dict()
    d["future_field"] = 1
    assert ContainerRecord.from_dict(d) == c


def test_store_update_persists_and_checks_transitions(tmp_path: Path) -> None:
    async def go() -> None:
        store: Store[ContainerRecord] = Store(
            CONTAINER_KIND, 1, lambda r: tmp_path / f"{r.id}.json", ContainerRecord.from_dict
        )
        c = await store.add(ctr())
        old, new = await store.update_pair(
            c.id, lambda r: r.__class__(**{**r.__dict__, "state": ContainerState.EXITED})
        )
        assert old.state is ContainerState.RUNNING and new.state is ContainerState.EXITED
        with pytest.raises(FailedPrecondition):
            await store.update(
                c.id, lambda r: r.__class__(**{**r.__dict__, "state": ContainerState.RUNNING})
            )
        again: Store[ContainerRecord] = Store(
            CONTAINER_KIND, 1, lambda r: tmp_path / f"{r.id}.json", ContainerRecord.from_dict
        )
        assert again.load(tmp_path / f"{c.id}.json").state is ContainerState.EXITED
        assert again.resolve("def4") == c.id and again.resolve("") is None
        await again.delete(c.id)
        assert not (tmp_path / f"{c.id}.json").exists()
        pods: Store[PodRecord] = Store(
            POD_KIND, 1, lambda r: tmp_path / "p.json", PodRecord.from_dict
        )
        await pods.add(pod())

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


def test_host_log_path() -> None:
    assert host_log_path("/var/log/pods/x", "c/0.log") == "/var/log/pods/x/c/0.log"
    assert host_log_path("", "c.log") == ""
    assert host_log_path("/d", "") == ""
    assert host_log_path("/d", "/abs/c.log") == "/abs/c.log"
    with pytest.raises(FailedPrecondition):
        host_log_path("/var/log/pods/x", "../../../etc/passwd")


def test_overlay_options_topmost_first() -> None:
    opts = overlay_options(
        [Path("/l/base"), Path("/l/mid"), Path("/l/top")], Path("/u"), Path("/w")
    )
    assert opts == "lowerdir=/l/top:/l/mid:/l/base,upperdir=/u,workdir=/w"
    with pytest.raises(Exception, match="character"):
        overlay_options([Path("/l/a,b")], Path("/u"), Path("/w"))


def test_event_bus_fan_out_and_overflow() -> None:
    async def go() -> None:
        bus = EventBus()
        got: list[EventKind] = []

        async def sub() -> None:
            async for ev in bus.subscribe():
                got.append(ev.kind)

        task = asyncio.create_task(sub())
        await asyncio.sleep(0)
        bus.publish(EventKind.CREATED, "c", "p")
        bus.publish(EventKind.STARTED, "c", "p")
        await asyncio.sleep(0)
        bus.close()
        await task
        assert got == [EventKind.CREATED, EventKind.STARTED]

    asyncio.run(go())
