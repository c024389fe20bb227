"""criv killed (or failing once) between every pair of steps of RunPodSandbox,
CreateContainer, StartContainer, StopPodSandbox and RemovePodSandbox, in host mode
(issue 13). After a restart without the failpoint the pod is whole and working or,
after kubelet's retries, gone: no process, netns, mount, link, cgroup, IPAM address or
pod dir left (tests/support/faults.py; the leak checks are the suite's teardown)."""

from __future__ import annotations

import pytest

from tests.support import faults
from tests.support.cri import Cri

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.mark.parametrize("point", faults.HOST_POINTS)
def test_kill_at(cri: Cri, point: str) -> None:
    ipam = faults.ipam_addresses(cri)
    pod, cid = faults.crash_at(cri, point)
    faults.check_after_crash(cri, point, pod, cid)
    faults.converge(cri, point)
    faults.check_gone(cri, ipam)


@pytest.mark.parametrize("point", faults.ERROR_POINTS)
def test_error_at(cri: Cri, point: str) -> None:
    ipam = faults.ipam_addresses(cri)
    faults.fail_once_at(cri, point)
    faults.converge(cri, point)
    faults.check_gone(cri, ipam)
