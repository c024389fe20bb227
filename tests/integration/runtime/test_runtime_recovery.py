"""criv restarts while pods run: agents outlive it, the new criv re-adopts them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support import scenarios
from tests.support.cri import Cri

pytestmark = pytest.mark.integration


@pytest.mark.timeout(180)
def test_restart_keeps_states_exit_codes_and_logs(cri: Cri) -> None:
    scenarios.restart_keeps_states_exit_codes_and_logs(cri)


@pytest.mark.timeout(120)
def test_agent_gone_is_reported_and_cleaned_up(cri: Cri) -> None:
    pod = cri.run_pod("lost")
    cid = cri.run(pod, "victim", ["sleep", "1000"])
    info = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=10
    ).info["info"]
    pid = json.loads(info)["pid"]
    assert pid > 0
    cri.proc.stop()
    os.killpg(pid, signal.SIGKILL)
    time.sleep(0.5)
    cri.proc.start()
    st = cri.status(cid)
    assert st.state == api_pb2.CONTAINER_EXITED
    assert st.reason == "AgentGone"
    assert cri.pod_status(pod).state == api_pb2.SANDBOX_NOTREADY
    # kubelet then stops and removes it; nothing may be left (leak checks).


def _mounted(path: Path) -> bool:
    return any(
        line.split()[4] == str(path)
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


@pytest.mark.timeout(120)
def test_start_sweeps_orphans(cri_factory: Any) -> None:
    cri = cri_factory(pull=False)
    run_dir = Path(cri.proc.config["run_dir"])
    state_dir = Path(cri.proc.config["state_dir"])
    cri.proc.stop()
    netns = run_dir / "netns" / "criv-0123456789ab"
    netns.parent.mkdir(parents=True, exist_ok=True)
    netns.touch()
    subprocess.run(["unshare", f"--net={netns}", "true"], check=True)
    rootfs = state_dir / "sandboxes" / ("f" * 64) / "containers" / ("e" * 64) / "rootfs"
    rootfs.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "orphan", str(rootfs)], check=True)
    sock_dir = run_dir / "p" / "0123456789ab"
    agent = subprocess.Popen(
        [str(Path(sys.executable).parent / "criv-agent"),
         "--control", f"unix:{sock_dir}/c.sock", "--data", f"unix:{sock_dir}/d.sock",
         "--state-dir", str(state_dir / "stray-agent")],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not (sock_dir / "c.sock").exists():
            assert time.monotonic() < deadline and agent.poll() is None
            time.sleep(0.05)
        cri.proc.start()
        assert agent.wait(10) == -signal.SIGKILL
        assert not _mounted(netns) and not netns.exists()
        assert not _mounted(rootfs)
        assert not (state_dir / "sandboxes" / ("f" * 64)).exists()
        assert not sock_dir.exists()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        for m in (rootfs, netns):
            if _mounted(m):
                subprocess.run(["umount", "-l", str(m)])
