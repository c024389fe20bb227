"""Container lifecycle through a real agent and crun: exit codes, logs, stop, events,
state across an agent restart."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import grpc
import pytest

from criv_agent.api.agent.v1 import agent_pb2
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.agent_harness import Agent

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
def test_health(agent: Agent) -> None:
    h = agent.stub.Health(agent_pb2.HealthRequest(), timeout=5)
    assert h.api_version == 1
    assert h.cgroup_version in ("v1", "v2")
    assert h.kernel_release


@pytest.mark.timeout(60)
def test_a_host_mode_agent_ignores_a_guest_identity(agent: Agent) -> None:
    # harmless values: were they applied, the host's clock would barely move and its
    # machine-id would be the same text, in a new inode (an atomic write replaces it)
    before = os.stat("/etc/machine-id") if os.path.exists("/etc/machine-id") else None
    mid = Path("/etc/machine-id").read_text().strip() if before is not None else ""
    ident = agent_pb2.GuestIdentity(
        entropy=b"\0" * 16, host_time_ns=time.time_ns(),
        machine_id=mid if re.fullmatch("[0-9a-f]{32}", mid) else "0" * 32, wait_seconds=1,
    )  # fmt: skip
    cfg = agent.sandbox_config()
    agent.stub.SetupSandbox(
        agent_pb2.SetupSandboxRequest(
            sandbox_id=agent.sandbox_id, config=cfg, sandbox_dir=str(agent.sandbox_dir),
            identity=ident,
        ),
        timeout=20,
    )  # fmt: skip
    if before is not None:
        after = os.stat("/etc/machine-id")
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert "guest identity in SetupSandbox is ignored" in agent.stderr()


@pytest.mark.timeout(60)
def test_exit_codes_and_reasons(agent: Agent) -> None:
    agent.setup()
    ok = agent.run("ok", ["sh", "-c", "exit 0"])
    assert (ok.state, ok.exit_code, ok.reason) == (agent_pb2.EXITED, 0, "Completed")
    bad = agent.run("bad", ["sh", "-c", "exit 7"])
    assert (bad.exit_code, bad.reason) == (7, "Error")
    assert bad.started_at_ns >= bad.created_at_ns > 0
    assert bad.finished_at_ns >= bad.started_at_ns
    agent.create("killed", ["sleep", "100"])
    agent.start_c("killed")
    agent.stub.SignalContainer(
        agent_pb2.SignalContainerRequest(container_id="killed", signal=9), timeout=10
    )
    killed = agent.wait("killed")
    assert (killed.exit_code, killed.reason) == (137, "Error")
    ids = [c.container_id for c in agent.stub.ListContainers(
        agent_pb2.ListContainersRequest(), timeout=5).containers]  # fmt: skip
    assert ids == ["ok", "bad", "killed"]
    agent.remove("ok")
    agent.remove("ok")  # idempotent
    with pytest.raises(grpc.RpcError) as e:
        agent.status("ok")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.timeout(60)
def test_command_merged_with_image(agent: Agent) -> None:
    agent.setup()
    cfg = api_pb2.ContainerConfig(args=["-c", "echo $GREETING $FROM_CRI; pwd"])
    cfg.envs.add(key="FROM_CRI", value=b"cri")
    image = {"Entrypoint": ["sh"], "Cmd": ["-c", "echo from image"],
             "Env": ["GREETING=hello", "FROM_CRI=image"], "WorkingDir": "/tmp"}  # fmt: skip
    info = agent.run("merge", [], image=image, config=cfg)
    assert info.exit_code == 0
    assert agent.logs("merge") == [("stdout", "F", "hello cri"), ("stdout", "F", "/tmp")]


@pytest.mark.timeout(60)
def test_logs_streams_partial_lines_and_eof(agent: Agent) -> None:
    agent.setup()
    script = "echo a; echo err >&2; head -c 20000 /dev/zero | tr '\\0' x; echo; printf b"
    info = agent.run("logs", ["sh", "-c", script])
    assert info.exit_code == 0
    recs = agent.logs("logs")
    assert ("stdout", "F", "a") in recs
    assert ("stderr", "F", "err") in recs
    out = [r for r in recs if r[0] == "stdout"]
    assert out[1] == ("stdout", "P", "x" * 16384)
    assert out[2] == ("stdout", "F", "x" * (20000 - 16384))
    # trailing content without newline at EOF: a partial record, as containerd writes it
    assert out[3] == ("stdout", "P", "b")
    # a LOG stream from an offset gets the rest only
    full = agent.log_stream("logs")
    assert agent.log_stream("logs", offset=len(full) - 10) == full[-10:]


@pytest.mark.timeout(60)
def test_nothing_lost_at_exit(agent: Agent) -> None:
    agent.setup()
    agent.run("many", ["sh", "-c", "seq 1 20000; seq 1 5000 >&2"])
    recs = agent.logs("many")
    assert [c for s, _, c in recs if s == "stdout"] == [str(i) for i in range(1, 20001)]
    assert len([1 for s, _, _ in recs if s == "stderr"]) == 5000


@pytest.mark.timeout(60)
def test_log_stream_follows_until_exit(agent: Agent) -> None:
    agent.setup()
    agent.create("follow", ["sh", "-c", "echo one; sleep 1; echo two"])
    agent.start_c("follow")
    t0 = time.monotonic()
    data = agent.log_stream("follow")
    assert time.monotonic() - t0 > 0.5  # it waited for the container
    assert [line.split(" ", 3)[3] for line in data.decode().splitlines()] == ["one", "two"]


@pytest.mark.timeout(60)
def test_tty_container_logs(agent: Agent) -> None:
    agent.setup()
    cfg = api_pb2.ContainerConfig(tty=True)
    info = agent.run("tty", ["sh", "-c", "test -t 1 && echo is-a-tty"], config=cfg)
    assert info.exit_code == 0
    assert agent.logs("tty") == [("stdout", "F", "is-a-tty")]


@pytest.mark.timeout(60)
def test_stop_timeout_then_sigkill(agent: Agent) -> None:
    agent.setup()
    agent.create("stubborn", ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"])
    agent.start_c("stubborn")
    time.sleep(0.3)
    t0 = time.monotonic()
    req = agent_pb2.StopContainerRequest(container_id="stubborn", timeout_seconds=1)
    info = agent.stub.StopContainer(req, timeout=30).info
    took = time.monotonic() - t0
    assert info.state == agent_pb2.EXITED and info.exit_code == 137
    assert 0.9 < took < 8


@pytest.mark.timeout(60)
def test_stop_uses_image_stop_signal(agent: Agent) -> None:
    agent.setup()
    script = "trap 'exit 42' USR1; trap '' TERM; while :; do sleep 0.1; done"
    agent.create("sig", ["sh", "-c", script], image={"StopSignal": "SIGUSR1"})
    agent.start_c("sig")
    time.sleep(0.3)
    req = agent_pb2.StopContainerRequest(container_id="sig", timeout_seconds=10)
    info = agent.stub.StopContainer(req, timeout=30).info
    assert info.exit_code == 42


@pytest.mark.timeout(60)
def test_stop_and_remove_created_container(agent: Agent) -> None:
    agent.setup()
    agent.create("never", ["sleep", "100"])
    req = agent_pb2.StopContainerRequest(container_id="never", timeout_seconds=1)
    assert agent.stub.StopContainer(req, timeout=30).info.state == agent_pb2.EXITED
    agent.remove("never")


@pytest.mark.timeout(60)
def test_events(agent: Agent) -> None:
    agent.setup()
    seen: list[tuple[int, str]] = []
    stream = agent.stub.Events(agent_pb2.EventsRequest(), timeout=30)

    def consume() -> None:
        try:
            for ev in stream:
                seen.append((ev.kind, ev.container_id))
                if ev.kind == agent_pb2.Event.REMOVED:
                    return
        except grpc.RpcError:
            pass

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.3)
    agent.run("ev", ["true"])
    agent.remove("ev")
    t.join(10)
    stream.cancel()
    E = agent_pb2.Event
    assert seen == [(E.CREATED, "ev"), (E.STARTED, "ev"), (E.EXITED, "ev"), (E.REMOVED, "ev")]


@pytest.mark.timeout(90)
def test_state_survives_agent_restart(agent: Agent) -> None:
    agent.setup()
    agent.run("done", ["sh", "-c", "echo before; exit 3"])
    agent.create("alive", ["sleep", "300"])
    agent.start_c("alive")
    agent.stop_process()
    agent.start()
    done = agent.status("done")
    assert (done.state, done.exit_code, done.reason) == (agent_pb2.EXITED, 3, "Error")
    assert agent.logs("done") == [("stdout", "F", "before")]
    alive = agent.status("alive")
    assert alive.state == agent_pb2.RUNNING
    assert agent.exec("alive", ["echo", "still"]).stdout == b"still\n"
    req = agent_pb2.StopContainerRequest(container_id="alive", timeout_seconds=1)
    assert agent.stub.StopContainer(req, timeout=30).info.state == agent_pb2.EXITED
