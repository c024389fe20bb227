"""vm-image pods that go wrong, through the real daemon: a containerDisk whose disk does not
boot (the container exits BootFailed with the firmware's words from the console; nothing
hangs, nothing is left), one whose boot loader hangs (ExecSync UNAVAILABLE within the SSH
wait with the console's tail; the stop destroys it), and a VM whose SSH server cannot be
reached (its network cut: ExecSync is UNAVAILABLE within ``vm.image_ssh_wait_seconds``,
and works again once the network is back)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.fixtures import TestRegistry
from tests.support.vm import criv_domains
from tests.support.vmimage import HANDLERS, set_tap, start_disk_pod

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

SSH_WAIT = 15


def garbage_disk(path: Path) -> Path:
    """1 MiB of noise without a boot signature: a raw disk no firmware boots."""
    data = bytearray(random.Random(11).randbytes(1 << 20))
    data[510:512] = b"\0\0"
    path.write_bytes(bytes(data))
    return path


def mbr_disk(path: Path, code: bytes) -> Path:
    """A 1 MiB raw disk whose boot sector (signed 0x55AA, so SeaBIOS runs it) is ``code``."""
    data = bytearray(1 << 20)
    data[: len(code)] = code
    data[510:512] = b"\x55\xaa"
    path.write_bytes(bytes(data))
    return path


HANG = bytes.fromhex("faf4ebfd")  # cli; hlt; jmp back to hlt: a boot loader that hangs
# cli; ds=0; lidt [0x7c20] (limit 0); int3: no IDT to deliver it, a triple fault, a reset
TRIPLE_FAULT = bytes.fromhex("fa31c08ed80f011e207cccf4ebfd")


def test_disk_that_does_not_boot(
    vm_cri_factory: Callable[..., Cri], registry: TestRegistry, tmp_path: Path
) -> None:
    cri = vm_cri_factory(runtime={"handlers": HANDLERS}, vm={"image_ssh_wait_seconds": SSH_WAIT})
    # a boot loader that triple-faults: the reset ends the domain before any host key
    tf = mbr_disk(tmp_path / "tf.raw", TRIPLE_FAULT)
    pod, cid = start_disk_pod(cri, registry, tf, tmp_path, "triplefault", "vm/triplefault")
    st = cri.wait_exited(cid, timeout=120)
    assert (st.exit_code, st.reason) == (255, "BootFailed"), st
    assert "Booting from Hard Disk" in st.message, st.message
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    # noise: the firmware says it found nothing to boot
    before = criv_domains()
    t0 = time.monotonic()
    noise = garbage_disk(tmp_path / "noise.raw")
    pod, cid = start_disk_pod(cri, registry, noise, tmp_path, "noboot", "vm/noise")
    # SeaBIOS says so on the console and resets; the reset ends the domain
    st = cri.wait_exited(cid, timeout=120)
    took = time.monotonic() - t0
    print(f"[vm-image] a disk that does not boot: EXITED {took:.1f} s after its push")
    print(st.message)
    assert (st.exit_code, st.reason) == (255, "BootFailed"), st
    assert "did not boot" in st.message and "No bootable device" in st.message, st.message
    assert "\x1b" not in st.message, st.message  # the firmware's terminal escapes dropped
    with pytest.raises(grpc.RpcError) as e:
        cri.exec(cid, ["true"])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value
    # the console is the container's log, as for a disk that boots
    assert "Boot failed" in cri.log(pod, "vm")
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    assert criv_domains() - before == set()
    assert not list((cri.proc.state_dir / "vmimage" / "pods").iterdir())


def test_disk_that_hangs_in_its_boot_loader(
    vm_cri_factory: Callable[..., Cri], registry: TestRegistry, tmp_path: Path
) -> None:
    cri = vm_cri_factory(runtime={"handlers": HANDLERS}, vm={"image_ssh_wait_seconds": SSH_WAIT})
    before = criv_domains()
    hang = mbr_disk(tmp_path / "hang.raw", HANG)
    pod, cid = start_disk_pod(cri, registry, hang, tmp_path, "hang", "vm/hang")
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        cri.exec(cid, ["true"], timeout=60)
    took = time.monotonic() - t0
    details = str(e.value.details())
    print(f"[vm-image] a boot loader that hangs: UNAVAILABLE after {took:.1f} s:\n{details}")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    assert f"no SSH host key on its console {SSH_WAIT}s after boot" in details, details
    assert "Booting from Hard Disk" in details, details  # where it stopped
    assert took < SSH_WAIT + 5, took
    assert cri.status(cid).state == api_pb2.CONTAINER_RUNNING  # the VM runs; it is the image's
    # the ACPI button goes unheard: destroyed after the stop's timeout
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=2), timeout=60)
    st = cri.status(cid)
    assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 137, "Killed"), st
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    assert criv_domains() - before == set()


def test_unreachable_ssh_is_unavailable_not_a_hang(
    vm_cri_factory: Callable[..., Cri], registry: TestRegistry, test_disk: Path, tmp_path: Path
) -> None:
    cri = vm_cri_factory(runtime={"handlers": HANDLERS}, vm={"image_ssh_wait_seconds": SSH_WAIT})
    before = criv_domains()
    pod, cid = start_disk_pod(cri, registry, test_disk, tmp_path, "nossh", "vm/testdisk")
    t0 = time.monotonic()
    set_tap(cri, pod, up=False)  # the VM boots and prints its key, but nothing reaches it
    with pytest.raises(grpc.RpcError) as e:
        cri.exec(cid, ["true"], timeout=60)
    took = time.monotonic() - t0
    print(f"[vm-image] ExecSync with the VM's network cut: UNAVAILABLE after {took:.1f} s")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    details = str(e.value.details())
    print(details[:600])
    assert "SSH not reachable" in details and f"{SSH_WAIT}s after boot" in details, details
    assert "criv-test-disk: ready" in details, details  # the console tail shows it booted
    assert took < SSH_WAIT + 15, took
    # the network comes back: a later call connects (the host's neighbour entry for the
    # VM may answer "no route" for a few seconds more, as kubelet's next probe would see)
    set_tap(cri, pod, up=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            r = cri.exec(cid, ["hostname"], timeout=60)
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert time.monotonic() < deadline, err
            time.sleep(1)
    assert (r.exit_code, r.stdout) == (0, b"nossh\n"), r
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=200)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    assert criv_domains() - before == set()
