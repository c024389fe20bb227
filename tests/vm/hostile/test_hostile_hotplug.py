"""Guest root against its VM's PCI hot-plug controller (docs/security.md: what the guest
controls).

A clone's share and NIC arrive by ACPI hot-plug, and the guest can eject them through the
same controller (``/sys/bus/pci/slots/N/power``). Guest root ejects both: QEMU unplugs them
from its own VM and nothing else. criv goes on serving, a pod started after it boots and
runs, and the pod is stopped and removed with nothing left behind (the fixtures' leak
checks)."""

from __future__ import annotations

import subprocess
import time

import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.vm import GUEST_ROOT, PRIVILEGED_POD

pytestmark = pytest.mark.vm

# the hot-plug slot (under /sys/bus/pci/slots) that holds the PCI function of a sysfs
# device path; its address file names the bus and device, without the function
SLOT_OF = (
    'pci=$(basename "$(dirname "$(readlink -f {dev})")"); '
    'for s in /sys/bus/pci/slots/*; do [ "$(cat "$s/address")" = "${{pci%.*}}" ] && echo "$s"; '
    "done; true"
)
SHARE_DEV = "/sys/bus/virtio/drivers/virtiofs/virtio*"
NIC_DEV = "/sys/class/net/eth0/device"


def _in_guest(cri: Cri, cid: str, script: str) -> str:
    r = cri.exec(cid, ["nsenter", "-t", "1", "-m", "--", "sh", "-c", script], timeout=120)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.stdout.decode()


def _live_xml(domain: str) -> str:
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", domain],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip


@pytest.mark.timeout(600)
def test_guest_root_ejecting_its_devices_hurts_only_its_pod(vm_cri: Cri) -> None:
    pod = vm_cri.run_pod("ejector", linux=PRIVILEGED_POD)
    iso = vm_cri.isolation_state(pod)
    domain = iso["domain"]
    assert iso["template"], "the pod is not a clone: nothing was hot-plugged"
    cid = vm_cri.run(pod, "root", ["sleep", "3600"], security=GUEST_ROOT)
    slots = _in_guest(
        vm_cri, cid, SLOT_OF.format(dev=SHARE_DEV) + "; " + SLOT_OF.format(dev=NIC_DEV)
    ).split()
    assert len(slots) == 2, slots
    before = _live_xml(domain)
    assert "<filesystem" in before and "<interface" in before

    # the share last: the container's own files are on it, so nothing of it runs after
    vm_cri.exec(cid, ["sh", "-c", f"echo 0 > {slots[1]}/power; echo 0 > {slots[0]}/power"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = _live_xml(domain)
        if "<filesystem" not in after and "<interface" not in after:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"QEMU did not unplug the ejected devices:\n{after}")

    later = vm_cri.run_pod("later")
    cid2 = vm_cri.run(later, "c", ["sleep", "3600"])
    assert vm_cri.exec(cid2, ["true"], timeout=60).exit_code == 0
    vm_cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    vm_cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    assert subprocess.run(["virsh", "-c", "qemu:///system", "domstate", domain],
                          capture_output=True).returncode != 0  # fmt: skip
