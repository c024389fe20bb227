"""ExecSync, CRI logs, OOM and stop timeouts, end to end through criv."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

from criv.agent.client import EXEC_SYNC_OUTPUT_LIMIT
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

pytestmark = pytest.mark.integration

PARTIAL_MAX = 16 * 1024


@pytest.mark.timeout(120)
def test_exec_sync_codes_deadline_and_cap(cri: Cri) -> None:
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


def _records(text: str) -> list[tuple[str, str, str]]:
    out = []
    for line in text.splitlines():
        _ts, stream, tag, content = line.split(" ", 3) if line.count(" ") >= 3 else (
            *line.split(" ", 2), "")  # fmt: skip
        out.append((stream, tag, content))
    return out


@pytest.mark.timeout(120)
def test_log_format_partial_lines_and_reopen(cri: Cri) -> None:
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
    first = _records(Path(log_path + ".1").read_text())
    second = _records(Path(log_path).read_text())
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


@pytest.mark.timeout(120)
def test_oom_killed_and_stop_timeout(cri: Cri) -> None:
    pod = cri.run_pod("oom")
    limit = api_pb2.LinuxContainerResources(memory_limit_in_bytes=32 * 1024 * 1024)
    hog = cri.run(
        pod, "hog", ["sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo $x"],
        resources=limit,
    )  # fmt: skip
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
