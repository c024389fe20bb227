"""Pod scenarios that must hold in every isolation mode, written once.

Plain functions over a started criv (``Cri``, tests/support/cri.py), whose runtime handler
(``cri.default_handler``: host, or vm in the vm suite) picks the mode. The runtime suite
(tests/integration/runtime, host mode) and the vm pod suite (tests/vm/pods, both modes)
call them from thin tests of their own.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import grpc
import pytest

from criv.agent.client import EXEC_SYNC_OUTPUT_LIMIT
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import SUBNET_PREFIX, Cri

CRI_LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) (stdout|stderr) [PF] "
)
PARTIAL_MAX = 16 * 1024


def log_records(text: str) -> list[tuple[str, str, str]]:
    """(stream, P/F tag, content) of each CRI log line."""
    out = []
    for line in text.splitlines():
        _ts, stream, tag, content = line.split(" ", 3) if line.count(" ") >= 3 else (
            *line.split(" ", 2), "")  # fmt: skip
        out.append((stream, tag, content))
    return out


def log_contents(text: str) -> list[str]:
    return [line.split(" ", 3)[3] for line in text.splitlines()]


def pod_and_container_lifecycle(cri: Cri) -> None:
    pod = cri.run_pod("life")
    st = cri.pod_status(pod)
    assert st.state == api_pb2.SANDBOX_READY
    assert st.network.ip.startswith(SUBNET_PREFIX)
    cid = cri.run(pod, "hello", ["sh", "-c", "echo out; echo err >&2; exit 3"])
    final = cri.wait_exited(cid)
    assert final.exit_code == 3
    assert final.reason == "Error"
    assert final.started_at > 0 and final.finished_at >= final.started_at
    assert final.image.image == cri.image
    assert final.log_path.endswith("hello.log")
    lines = cri.log(pod, "hello").splitlines()
    assert all(CRI_LOG_LINE.match(line) for line in lines), lines
    assert {line.split(" ", 3)[1] + ":" + line.split(" ", 3)[3] for line in lines} == {
        "stdout:out",
        "stderr:err",
    }
    listed = cri.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers
    assert [c.id for c in listed] == [cid]
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=30)
    assert cri.pod_status(pod).state == api_pb2.SANDBOX_NOTREADY
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=30)
    assert not cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items


def exec_sync_codes_deadline_and_cap(cri: Cri) -> None:
    pod = cri.run_pod("exec")
    cid = cri.run(pod, "sleeper", ["sleep", "1000"])
    r = cri.exec(cid, ["sh", "-c", "echo hi; echo oops >&2; exit 5"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"hi\n", b"oops\n", 5)
    assert cri.exec(cid, ["true"]).exit_code == 0
    assert cri.exec(cid, ["hostname"]).stdout == b"exec\n"  # the pod's hostname
    r = cri.exec(cid, ["/no/such/binary"])
    assert r.exit_code != 0
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        cri.exec(cid, ["sleep", "30"], timeout=1)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 10
    big = EXEC_SYNC_OUTPUT_LIMIT + 1024 * 1024
    r = cri.exec(cid, ["sh", "-c", f"head -c {big} /dev/zero; echo done >&2"], timeout=30)
    assert len(r.stdout) == EXEC_SYNC_OUTPUT_LIMIT
    assert r.stderr == b"done\n" and r.exit_code == 0
    # Not running: refused.
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=30)
    with pytest.raises(grpc.RpcError):
        cri.exec(cid, ["true"])


def log_format_partial_lines_and_reopen(cri: Cri) -> None:
    pod = cri.run_pod("logs")
    n = 40000
    script = (
        f"head -c {n} /dev/zero | tr '\\0' x; echo; echo short; "
        "printf tail-no-newline >&2; sleep 2; echo after-reopen"
    )
    cid = cri.run(pod, "writer", ["sh", "-c", script])
    time.sleep(1.0)  # the first lines are on the host by now
    log_path = cri.status(cid).log_path
    os.rename(log_path, log_path + ".1")
    cri.rt.ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=cid), timeout=10)
    cri.wait_exited(cid)
    first = log_records(Path(log_path + ".1").read_text())
    second = log_records(Path(log_path).read_text())
    out = [r for r in first if r[0] == "stdout"]
    # the long line: P records of at most 16 KiB, then the F record ending it
    assert [t for _, t, _ in out[:3]] == ["P", "P", "F"]
    assert all(len(c) <= PARTIAL_MAX for _, _, c in out[:3])
    assert "".join(c for _, _, c in out[:3]) == "x" * n
    assert out[3] == ("stdout", "F", "short")
    err = [r for r in first + second if r[0] == "stderr"]
    assert "".join(c for _, _, c in err) == "tail-no-newline"
    assert ("stdout", "F", "after-reopen") in second
    assert cri.status(cid).exit_code == 0


def oom_killed_and_stop_timeout(cri: Cri) -> None:
    pod = cri.run_pod("oom")
    limit = api_pb2.LinuxContainerResources(memory_limit_in_bytes=32 * 1024 * 1024)
    # The shell doubles a string until the limit: one process (so it is the OOM victim)
    # and ~2 s under TCG. Filling a string from a pipe took 14-30 s there and timed out
    # once on a loaded CI machine.
    hog = cri.run(pod, "hog", ["sh", "-c", "x=a; while :; do x=$x$x; done"], resources=limit)
    st = cri.wait_exited(hog, timeout=60)
    assert st.reason == "OOMKilled", (st.reason, st.exit_code, st.message)
    assert st.exit_code == 137
    assert st.resources.linux.memory_limit_in_bytes == 32 * 1024 * 1024
    # TERM ignored: StopContainer waits its timeout, then SIGKILLs.
    stubborn = cri.run(pod, "stubborn", ["sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"])
    polite = cri.run(pod, "polite", ["sleep", "1000"])
    time.sleep(0.3)
    t0 = time.monotonic()
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=stubborn, timeout=2), timeout=30)
    took = time.monotonic() - t0
    assert 1.8 <= took < 10, took
    st = cri.status(stubborn)
    assert st.state == api_pb2.CONTAINER_EXITED and st.exit_code == 137
    t0 = time.monotonic()
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=polite, timeout=30), timeout=60)
    assert time.monotonic() - t0 < 5
    assert cri.status(polite).exit_code == 143
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=polite, timeout=30), timeout=60)


def restart_keeps_states_exit_codes_and_logs(cri: Cri) -> None:
    pod = cri.run_pod("restart")
    done = cri.run(pod, "done", ["sh", "-c", "echo finished; exit 7"])
    loop = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done"
    ticker = cri.run(pod, "ticker", ["sh", "-c", loop])
    late = cri.run(pod, "late", ["sh", "-c", "sleep 2; echo late-line; exit 4"])
    assert cri.wait_exited(done).exit_code == 7
    ip = cri.pod_status(pod).network.ip
    time.sleep(0.5)
    cri.proc.restart()  # `late` exits, `ticker` keeps logging while criv is down
    time.sleep(2.5)
    st = cri.pod_status(pod)
    assert st.state == api_pb2.SANDBOX_READY and st.network.ip == ip
    assert cri.status(done).exit_code == 7
    assert cri.status(done).state == api_pb2.CONTAINER_EXITED
    assert cri.status(ticker).state == api_pb2.CONTAINER_RUNNING
    late_st = cri.wait_exited(late)
    assert late_st.exit_code == 4 and late_st.reason == "Error"
    assert log_contents(cri.log(pod, "late")) == ["late-line"]
    assert log_contents(cri.log(pod, "done")) == ["finished"]
    # The ticker's log has every line exactly once across the restart.
    ticks = log_contents(cri.log(pod, "ticker"))
    assert len(ticks) > 20
    assert ticks == [f"tick {i}" for i in range(len(ticks))]
    # The re-adopted agent still takes orders.
    assert cri.exec(ticker, ["echo", "alive"]).stdout == b"alive\n"
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=ticker, timeout=5), timeout=30)
    assert cri.status(ticker).exit_code == 143
    listed = cri.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers
    names = {c.metadata.name for c in listed}
    assert names == {"done", "ticker", "late"}
