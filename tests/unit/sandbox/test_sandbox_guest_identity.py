"""The identity criv hands a pod's agent at SetupSandbox: vm pods get one (fresh entropy
and time, a machine-id stable per pod, the share's tag and a wait), host and vm-image pods
none; it survives the trip to the agent's checks unchanged; the client sends it."""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from criv.agent import convert
from criv.agent.client import CALL_TIMEOUT, AgentClient
from criv.agent.types import GuestIdentity
from criv.config import Config
from criv.sandbox.host import HostIsolation
from criv.sandbox.records import PodRecord
from criv.sandbox.states import PodState
from criv.sandbox.vm import GUEST_SHARED, VmIsolation
from criv.sandbox.vm.host import VmHost
from criv.sandbox.vmimage.isolation import VmImageIsolation
from criv.state.runtime_state import RuntimeState
from criv_agent import identity
from criv_agent.api.agent.v1 import agent_pb2
from criv_agent.api.runtime.v1 import api_pb2


def _config(tmp_path: Path) -> Config:
    return Config(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"))


def _pod(pod_id: str = "ab" * 32) -> PodRecord:
    return PodRecord(
        id=pod_id, name="p", namespace="n", uid="u", attempt=0, state=PodState.READY,
        created_at_ns=1, handler="", isolation="vm", config=b"",
    )  # fmt: skip


def test_a_vm_pod_gets_an_identity_stable_per_pod(tmp_path: Path) -> None:
    iso = VmIsolation(_config(tmp_path), RuntimeState(tmp_path))
    before = time.time_ns()
    a, again = iso.guest_identity(_pod()), iso.guest_identity(_pod())
    other = iso.guest_identity(_pod("cd" * 32))
    assert a is not None and again is not None and other is not None
    assert re.fullmatch(r"[0-9a-f]{32}", a.machine_id)
    assert a.machine_id == again.machine_id != other.machine_id
    assert len(a.entropy) == 64 and a.entropy != again.entropy
    assert before <= a.host_time_ns <= time.time_ns()
    assert (a.share_tag, a.wait_seconds) == ("criv", 20)
    assert identity.SHARED_DIR == GUEST_SHARED  # where the agent mounts that share


def test_host_and_vm_image_pods_get_none(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert HostIsolation(cfg).guest_identity(_pod()) is None
    vmimage = VmImageIsolation(cfg, VmHost(cfg, RuntimeState(tmp_path)))
    assert vmimage.guest_identity(_pod()) is None


def test_the_identity_reaches_the_agents_checks_unchanged(tmp_path: Path) -> None:
    sent = VmIsolation(_config(tmp_path), RuntimeState(tmp_path)).guest_identity(_pod())
    assert sent is not None
    wire = convert.guest_identity(sent).SerializeToString()
    got = identity.check(agent_pb2.GuestIdentity.FromString(wire))
    back = GuestIdentity(
        got.entropy, got.host_time_ns, got.machine_id, got.share_tag, got.wait_seconds
    )
    assert back == sent


async def test_the_client_sends_it_and_waits_longer_for_the_answer() -> None:
    calls: list[tuple[Any, float]] = []

    async def setup(req: Any, timeout: float) -> agent_pb2.SetupSandboxResponse:
        calls.append((req, timeout))
        return agent_pb2.SetupSandboxResponse()

    client = AgentClient("unix:/nonexistent/criv-test.sock")
    client._stub = SimpleNamespace(SetupSandbox=setup)  # type: ignore[assignment]
    try:
        config = api_pb2.PodSandboxConfig().SerializeToString()
        ident = GuestIdentity(b"e" * 8, 42, "f" * 32, "criv", 20)
        await client.setup_sandbox("p", config, "/d", [], identity=ident)
        await client.setup_sandbox("p", config, "/d", [])
    finally:
        await client.close()
    (with_id, t1), (without, t2) = calls
    assert with_id.HasField("identity") and not without.HasField("identity")
    assert with_id.identity.machine_id == "f" * 32 and with_id.identity.entropy == b"e" * 8
    assert (with_id.identity.host_time_ns, with_id.identity.share_tag) == (42, "criv")
    assert with_id.identity.wait_seconds == 20
    assert (t1, t2) == (CALL_TIMEOUT + 20, CALL_TIMEOUT)
