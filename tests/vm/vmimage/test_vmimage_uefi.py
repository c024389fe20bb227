"""vm-image disks that need UEFI, through the real daemon: the test disk's UEFI variant
(GPT, an EFI system partition with systemd-boot, no BIOS boot code) boots under OVMF with
no annotation, answers over SSH, sees EFI firmware, powers off cleanly, and leaves no
variable store behind; without OVMF it is refused at CreateContainer; the
``criv.dev/firmware`` annotation forces SeaBIOS (which has nothing to run on it) or is
refused when it names no firmware."""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from criv.hypervisor.hostsetup import QEMU_USER
from criv.sandbox.vmimage.machine import pod_dir
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.fixtures import TestRegistry
from tests.support.vm import criv_domains
from tests.support.vmimage import HANDLERS, create, pull, push_containerdisk

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

SSH_WAIT = 15


def _remove_pod(cri: Cri, pod: str) -> None:
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)


def test_uefi_disk_boots_under_ovmf(
    vm_cri_factory: Callable[..., Cri],
    registry: TestRegistry,
    test_disk_uefi: Path,
    tmp_path: Path,
) -> None:
    cri = vm_cri_factory(runtime={"handlers": HANDLERS})
    before = criv_domains()
    ref = push_containerdisk(registry, test_disk_uefi, tmp_path, "vm/uefidisk")
    pull(cri, ref)
    t0 = time.monotonic()
    pod = cri.run_pod("uefi", handler="vm-image")
    cid = create(cri, pod, "vm", ref)
    cri.start(cid)
    r = cri.exec(cid, ["hostname"], timeout=300)
    print(f"[vm-image] UEFI: RunPodSandbox to first ExecSync answer {time.monotonic() - t0:.1f} s")
    assert (r.exit_code, r.stdout) == (0, b"uefi\n"), (r, cri.proc.logs())
    # the kernel came up through its EFI stub: the firmware's runtime is there
    r = cri.exec(cid, ["ls", "/sys/firmware/efi"])
    assert r.exit_code == 0 and b"runtime" in r.stdout, r
    assert "boots with uefi: GPT disk with an EFI system partition" in cri.proc.logs()
    # the VM's own variable store, QEMU's to write, in criv's per-pod dir
    store = pod_dir(cri.proc.state_dir / "vmimage", pod) / f"vars-{cid[:12]}.fd"
    st = os.stat(store)
    assert (st.st_uid, st.st_mode & 0o777) == (pwd.getpwnam(QEMU_USER).pw_uid, 0o600)
    # the ACPI power button under OVMF: a clean power-off
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=120), timeout=180)
    got = cri.status(cid)
    assert (got.exit_code, got.reason) == (0, "Completed"), got
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=60)
    assert not store.exists()
    _remove_pod(cri, pod)
    assert criv_domains() - before == set()


def test_firmware_refusals_and_the_annotation(
    vm_cri_factory: Callable[..., Cri],
    registry: TestRegistry,
    test_disk_uefi: Path,
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no-ovmf" / "OVMF_CODE_4M.fd"
    cri = vm_cri_factory(
        runtime={"handlers": HANDLERS},
        vm={"uefi_code": str(missing), "image_ssh_wait_seconds": SSH_WAIT},
    )
    before = criv_domains()
    ref = push_containerdisk(registry, test_disk_uefi, tmp_path, "vm/uefidisk")
    pull(cri, ref)
    pod = cri.run_pod("fw", handler="vm-image")
    # a disk that needs UEFI on a host without OVMF: refused, naming what is missing
    with pytest.raises(grpc.RpcError) as e:
        create(cri, pod, "vm", ref)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
    assert "needs UEFI" in str(e.value.details()) and str(missing) in str(e.value.details())
    with pytest.raises(grpc.RpcError) as e:
        create(cri, pod, "vm", ref, {"criv.dev/firmware": "efi"})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    # forced to SeaBIOS: it runs the protective MBR's empty boot code and never gets
    # anywhere; the first exec gives up after the SSH wait with SeaBIOS's words
    cid = create(cri, pod, "vm", ref, {"criv.dev/firmware": "bios"})
    cri.start(cid)
    with pytest.raises(grpc.RpcError) as e:
        cri.exec(cid, ["true"], timeout=120)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    assert "Booting from Hard Disk" in str(e.value.details()), e.value.details()
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=2), timeout=60)
    assert cri.status(cid).exit_code == 137
    _remove_pod(cri, pod)
    assert criv_domains() - before == set()
    assert not list((cri.proc.state_dir / "vmimage" / "pods").iterdir())
