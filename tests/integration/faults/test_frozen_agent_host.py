"""An agent that stops answering (SIGSTOP: a hung or hostile agent) cannot stall
StopPodSandbox beyond its containers' deadline: criv gives up on a graceful stop,
destroys what runs the pod and releases it (issue 13)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support import faults
from tests.support.cri import Cri

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_stop_pod_with_a_frozen_agent(cri: Cri) -> None:
    ipam = faults.ipam_addresses(cri)
    pod = cri.run_pod(faults.POD)
    cid = cri.run(pod, faults.APP, faults.SLEEP)
    resp = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=30
    )
    pid = int(json.loads(resp.info["info"])["isolationState"]["pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=90)
        took = time.monotonic() - t0
    finally:
        # a failed stop must not leave a stopped process behind for the leak checks
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGCONT)
    assert not os.path.exists(f"/proc/{pid}"), "the frozen agent was not killed"
    assert cri.pod_status(pod).state == api_pb2.SANDBOX_NOTREADY
    assert cri.status(cid).state == api_pb2.CONTAINER_EXITED
    assert "destroyed: containers did not stop" in cri.proc.logs(), took
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    faults.check_gone(cri, ipam)
