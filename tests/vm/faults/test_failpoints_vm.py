"""criv killed at every failpoint in vm mode (issue 13): between the steps of
RunPodSandbox and of the VM's boot (tap, vsock backend, virtiofsd, domain),
CreateContainer, StartContainer, StopPodSandbox and RemovePodSandbox. After a restart
without the failpoint the pod is whole (exec works) or gone after kubelet's Stop and
Remove, and no domain, QEMU, backend, virtiofsd, tap, netns, mount or IPAM address is left
(tests/support/faults.py; the suite's teardown checks the rest).

One boot per case (TCG boots take seconds): the host suite (tests/integration/faults)
also runs the pod again with the same metadata after each; the name and network logic
that checks is the same in both modes.
"""

from __future__ import annotations

import pytest

from criv.failpoints import POINTS
from tests.support import faults
from tests.support.cri import Cri

pytestmark = [pytest.mark.vm, pytest.mark.timeout(400)]


@pytest.mark.parametrize("point", POINTS)
def test_kill_at(vm_cri: Cri, point: str) -> None:
    ipam = faults.ipam_addresses(vm_cri)
    pod, cid = faults.crash_at(vm_cri, point)
    faults.check_after_crash(vm_cri, point, pod, cid)
    faults.converge(vm_cri, point, run_again=False)
    faults.check_gone(vm_cri, ipam)
