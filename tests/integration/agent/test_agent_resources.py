"""Resources, stats, OOM, namespaces and pod files through a real agent and crun."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from criv_agent.api.agent.v1 import agent_pb2
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.agent_harness import Agent

pytestmark = pytest.mark.integration

NS = api_pb2.NamespaceMode


def _cgroup_file(agent: Agent, cid: str, ctrl: str, name: str) -> Path:
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    base = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup", ctrl)
    return base / "criv" / agent.sandbox_id / cid / name


@pytest.mark.timeout(60)
def test_oom_killed(agent: Agent) -> None:
    agent.setup()
    cfg = api_pb2.ContainerConfig()
    cfg.linux.resources.memory_limit_in_bytes = 8 << 20
    script = "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo ${#x}"
    info = agent.run("oom", ["sh", "-c", script], config=cfg)
    assert info.reason == "OOMKilled"
    assert info.exit_code == 137


@pytest.mark.timeout(60)
def test_stats_and_update(agent: Agent) -> None:
    agent.setup()
    cfg = api_pb2.ContainerConfig()
    cfg.linux.resources.memory_limit_in_bytes = 64 << 20
    cfg.linux.resources.cpu_shares = 512
    agent.create("busy", ["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; "
                          "sleep 300"], config=cfg)  # fmt: skip
    agent.start_c("busy")
    time.sleep(0.5)
    st = agent.stub.Stats(agent_pb2.StatsRequest(container_ids=["busy"]), timeout=10).stats
    assert len(st) == 1
    s = st[0]
    assert s.cpu_usage_core_nanoseconds > 0
    assert s.memory_usage_bytes > 0 and s.memory_working_set_bytes > 0
    assert 0 < s.memory_available_bytes <= 64 << 20
    assert s.process_count >= 1
    assert s.timestamp_ns > 0
    limit = _cgroup_file(agent, "busy", "memory", "memory.limit_in_bytes")
    if limit.exists():
        assert int(limit.read_text()) == 64 << 20
    new = api_pb2.LinuxContainerResources(memory_limit_in_bytes=128 << 20, cpu_shares=256)
    agent.stub.UpdateContainerResources(
        agent_pb2.UpdateContainerResourcesRequest(container_id="busy", linux=new), timeout=10
    )
    if limit.exists():
        assert int(limit.read_text()) == 128 << 20
    info = agent.status("busy")
    assert info.resources.memory_limit_in_bytes == 128 << 20
    assert info.resources.cpu_shares == 256

    # a CFS quota, then -1 (unlimited) lifts it again (crun alone writes -1 as 2^64-1)
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    quota = _cgroup_file(agent, "busy", "cpu", "cpu.max" if v2 else "cpu.cfs_quota_us")
    for q, want in ((50_000, "50000"), (-1, "max" if v2 else "-1")):
        new = api_pb2.LinuxContainerResources(cpu_quota=q, cpu_shares=512)
        agent.stub.UpdateContainerResources(
            agent_pb2.UpdateContainerResourcesRequest(container_id="busy", linux=new), timeout=10
        )
        assert quota.read_text().split()[0] == want
    # a value the kernel refuses is the caller's to fix, not an agent failure
    bad = api_pb2.LinuxContainerResources(cpuset_cpus="4095")
    with pytest.raises(grpc.RpcError) as e:
        agent.stub.UpdateContainerResources(
            agent_pb2.UpdateContainerResourcesRequest(container_id="busy", linux=bad), timeout=10
        )
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()


@pytest.mark.timeout(60)
def test_pod_files_hostname_and_shared_ipc_pid(agent: Agent) -> None:
    agent.setup(pid=NS.POD, network=NS.POD)
    agent.create("a", ["sh", "-c", "echo shared > /dev/shm/marker; exec sleep 300"])
    agent.start_c("a")
    time.sleep(0.3)
    r = agent.exec("a", ["sh", "-c", "hostname; cat /etc/resolv.conf; grep podhost /etc/hosts"])
    assert r.stdout.decode().splitlines() == [
        "podhost", "search t.svc", "nameserver 10.0.0.10", "10.1.2.3\tpodhost"]  # fmt: skip
    code, out = 0, None
    info = agent.run("b", ["sh", "-c", "cat /dev/shm/marker; ps -o args | grep -c 'sleep 30[0]'"])
    out = [c for _, _, c in agent.logs("b")]
    code = info.exit_code
    assert (code, out) == (0, ["shared", "1"])


def _spares(agent: Agent) -> list[int]:
    return [int(m.split()[1].rstrip(":")) for m in agent.group_members()
            if "criv_agent/holder.py --spare" in m]  # fmt: skip


@pytest.mark.timeout(60)
def test_the_pods_holder_is_the_spare_the_agent_started(agent: Agent) -> None:
    """The agent starts a spare holder before it serves (spare.py); the pod's holder is
    that process, in namespaces of its own. An agent restarting beside its pod starts
    none."""
    [spare] = _spares(agent)
    own = {ns: os.stat(f"/proc/self/ns/{ns}").st_ino for ns in ("ipc", "uts")}
    assert {ns: os.stat(f"/proc/{spare}/ns/{ns}").st_ino for ns in own} == own
    agent.setup(pid=NS.POD, network=NS.POD)
    record = json.loads((agent.state_dir / "sandbox.json").read_text())
    assert record["holder_pid"] == spare
    for ns, ino in own.items():
        assert os.stat(f"/proc/{spare}/ns/{ns}").st_ino != ino
    uts = subprocess.run(["nsenter", f"--uts=/proc/{spare}/ns/uts", "hostname"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert uts.stdout == "podhost\n"
    agent.stop_process()
    agent.start()
    assert _spares(agent) == []  # (the holder stays in the first agent's group)
    assert os.path.exists(f"/proc/{spare}")


@pytest.mark.timeout(60)
def test_a_hostname_that_is_not_one_is_refused(agent: Agent) -> None:
    cfg = agent.sandbox_config()
    cfg.hostname = "podhost\npid other"
    with pytest.raises(grpc.RpcError) as e:
        agent.setup(cfg)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert len(_spares(agent)) == 1  # still waiting, for a pod with a good name
    assert not agent.sandbox_dir.exists()
    agent.setup()


@pytest.mark.timeout(60)
def test_host_path_mounts(agent: Agent, tmp_path: Path) -> None:
    agent.setup()
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "in.txt").write_text("from host\n")
    cfg = api_pb2.ContainerConfig()
    info = agent.run("rw", ["sh", "-c", "cat /data/in.txt; echo hi > /data/out.txt"],
                     config=cfg, mounts=[("/data", str(vol))])  # fmt: skip
    assert info.exit_code == 0
    assert (vol / "out.txt").read_text() == "hi\n"
    # read-only: the CRI flag; without a ResolvedMount the agent binds host_path as is
    cfg = api_pb2.ContainerConfig()
    cfg.mounts.add(container_path="/data", host_path=str(vol), readonly=True)
    agent.create("ro", ["sh", "-c", "cat /data/in.txt; (echo x > /data/o2) 2>/dev/null || "
                        "echo denied"], config=cfg)  # fmt: skip
    agent.start_c("ro")
    agent.wait("ro")
    assert [c for _, _, c in agent.logs("ro")] == ["from host", "denied"]


@pytest.mark.timeout(60)
def test_sysctls_applied(agent: Agent) -> None:
    cfg = agent.sandbox_config()
    cfg.linux.sysctls["kernel.shm_rmid_forced"] = "1"
    agent.sb_config = cfg
    agent.stub.SetupSandbox(
        agent_pb2.SetupSandboxRequest(sandbox_id=agent.sandbox_id, config=cfg,
                                      sandbox_dir=str(agent.sandbox_dir)), timeout=20)  # fmt: skip
    info = agent.run("sys", ["cat", "/proc/sys/kernel/shm_rmid_forced"])
    assert info.exit_code == 0
    assert agent.logs("sys") == [("stdout", "F", "1")]


@pytest.mark.timeout(60)
def test_oom_event_while_running(agent: Agent) -> None:
    agent.setup()
    seen: list[tuple[int, str]] = []
    stream = agent.stub.Events(agent_pb2.EventsRequest(), timeout=40)

    def consume() -> None:
        with contextlib.suppress(grpc.RpcError):
            for ev in stream:
                seen.append((ev.kind, ev.container_id))
                if ev.kind == agent_pb2.Event.OOM:
                    return

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.3)
    cfg = api_pb2.ContainerConfig()
    cfg.linux.resources.memory_limit_in_bytes = 8 << 20
    # a child is OOM-killed, the container's init lives on. The child says it is the one to
    # kill (oom_score_adj 1000, which anyone may raise): the kernel's pick by size alone
    # once took the init (CI)
    script = (
        "(echo 1000 > /proc/self/oom_score_adj; x=$(head -c 67108864 /dev/zero | tr '\\0' a));"
        " echo survived; sleep 300"
    )
    agent.create("child-oom", ["sh", "-c", script], config=cfg)
    agent.start_c("child-oom")
    t.join(20)
    stream.cancel()
    assert (agent_pb2.Event.OOM, "child-oom") in seen
    assert agent.status("child-oom").state == agent_pb2.RUNNING
    req = agent_pb2.StopContainerRequest(container_id="child-oom", timeout_seconds=0)
    info = agent.stub.StopContainer(req, timeout=30).info
    assert info.reason == "OOMKilled"  # as containerd: an OOM kill marks the container
