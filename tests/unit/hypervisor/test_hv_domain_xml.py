"""Domain XML against golden files. Regenerate on purpose with:

CRIV_REGEN_GOLDEN=1 .venv/bin/pytest tests/unit/hypervisor/test_hv_domain_xml.py
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from criv.errors import InvalidArgument
from criv.hypervisor.domain import QEMU_NS, DirectBoot, Domain, Rng, SerialLog, UefiFirmware
from criv.hypervisor.sizing import VmSize
from criv.hypervisor.spec import (
    TEMPLATE_DOMAIN_PREFIX,
    ImageVm,
    PodVm,
    agent_cmdline,
    domain_name,
    image_domain,
    mac_for,
    pod_domain,
    template_shape,
)
from criv.sandbox.vm.clone import clone_domain

GOLDEN = Path(__file__).parent / "golden"
IMG = Path("/var/lib/criv/cache/guest-image/image-0123456789abcdef")


def _pod(**kw: object) -> PodVm:
    base: dict[str, object] = {
        "sandbox_id": "f" * 64,
        "kernel": IMG / "vmlinux",
        "initrd": IMG / "initramfs.cpio",
        "size": VmSize(1, 256),
        "accel": "tcg",
        "console_log": Path("/var/log/criv/pods/ffff/console.log"),
        "fs_socket": Path("/run/criv/p/ffff/fs.sock"),
        "tap": "tapffff0",
        "vsock_socket": Path("/run/criv/vsock/ffff/vhost-user.sock"),
        "agent_args": ["--vsock", "--port=1024"],
    }
    base.update(kw)
    return PodVm(**base)  # type: ignore[arg-type]


# the default guest image: a small initramfs that mounts the root from a read-only disk
ROOT_DISK: dict[str, Any] = {
    "initrd": IMG / "initramfs-early.cpio",
    "root_disk": IMG / "root.erofs",
    "root_disk_bytes": 72 << 20,
}


def _image_vm(**kw: Any) -> ImageVm:
    return ImageVm(
        sandbox_id="e" * 64,
        disk=Path("/var/lib/criv/vmimage/pods/eeee/overlay-eeee.qcow2"),
        seed=Path("/var/lib/criv/vmimage/pods/eeee/seed-eeee.iso"),
        size=VmSize(1, 256),
        accel="tcg",
        console_log=Path("/var/lib/criv/sandboxes/eeee/vmimage/eeee/console.log"),
        **kw,
    )


CASES: dict[str, Domain] = {
    # 1 vCPU booted, 2 hot-pluggable; 256 MiB, up to 512 behind the balloon
    # (UpdatePodSandboxResources)
    # the guest root on a read-only disk (the default image): criv.root= names it
    "q35-tcg-backend": pod_domain(_pod(max_vcpus=2, max_memory_mib=512, **ROOT_DISK)),
    "q35-kvm-kernel-vsock": pod_domain(
        _pod(accel="kvm", vsock_socket=None, vsock_cid=42, size=VmSize(2, 512))
    ),
    # no ACPI on microvm: no hot-pluggable vCPUs whatever is asked
    "microvm-tcg": pod_domain(
        _pod(machine="microvm", tsc_khz=2_000_000, fs_socket=None, max_vcpus=4)
    ),
    # a template: the pod's shape, no device of its own, empty root ports for a clone's
    "q35-tcg-template": pod_domain(
        replace(
            template_shape(_pod(max_vcpus=2, max_memory_mib=512, **ROOT_DISK)),
            name=TEMPLATE_DOMAIN_PREFIX + "0123456789abcdef",
            console_log=Path("/run/criv/templates/.k.building/console.log"),
            owner="/var/lib/criv",
        )
    ),
    # its clone: the same but the pod's name, UUID, console, and -incoming
    "q35-tcg-clone": clone_domain(_pod(max_vcpus=2, max_memory_mib=512, **ROOT_DISK)),
    "minimal": Domain(
        name="criv-minimal",
        uuid="00000000-0000-0000-0000-000000000001",
        boot=DirectBoot(Path("/k/vmlinux"), None, "console=ttyS0"),
        devices=(SerialLog(Path("/tmp/c.log")), Rng()),
        shared_memory=False,
    ),
    "vm-image-tcg": image_domain(
        _image_vm(
            tap="crivteeeeeeeeee", mac="02:00:00:00:00:01", mtu=1500, owner="/var/lib/criv#vm-image"
        )
    ),
    # a disk that needs UEFI: OVMF's code read-only, the VM's own variable store
    "vm-image-uefi-tcg": image_domain(
        _image_vm(
            uefi=UefiFirmware(
                Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
                Path("/var/lib/criv/vmimage/pods/eeee/vars-eeee.fd"),
            )
        )
    ),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", sorted(CASES))
def test_domain_xml_matches_golden(name: str) -> None:
    xml = CASES[name].to_xml()
    path = GOLDEN / f"{name}.xml"
    if os.environ.get("CRIV_REGEN_GOLDEN"):
        path.write_text(xml)
    assert xml == path.read_text(), f"{path} differs; regenerate with CRIV_REGEN_GOLDEN=1"
    ET.fromstring(xml)  # well-formed


@pytest.mark.timeout(10)
def test_policy_choices() -> None:
    tcg = pod_domain(_pod()).to_element()
    assert tcg.get("type") == "qemu"
    assert tcg.findtext("features/tcg/tb-cache") == "64"
    # a balloon (live memory resize) with free page reporting; no hold-back by default
    balloon = tcg.find("devices/memballoon")
    assert balloon is not None and balloon.attrib == {
        "model": "virtio",
        "freePageReporting": "on",
    }
    assert tcg.find("currentMemory") is None and tcg.findtext("memory") == "256"
    # most memory above the boot size: the guest boots with it, the balloon holds it back
    big = pod_domain(_pod(size=VmSize(1, 256), max_memory_mib=1024)).to_element()
    assert (big.findtext("memory"), big.findtext("currentMemory")) == ("1024", "256")
    assert tcg.find("devices/rng") is not None
    cmdline = tcg.findtext("os/cmdline") or ""
    assert "criv.agent_args=--vsock,--port=1024" in cmdline
    assert "tsc_early_khz" not in cmdline
    for ev in ("on_poweroff", "on_reboot", "on_crash"):
        assert tcg.findtext(ev) == "destroy"
    vcpu = pod_domain(_pod(size=VmSize(2, 256), max_vcpus=8)).to_element().find("vcpu")
    assert vcpu is not None and (vcpu.text, vcpu.get("current")) == ("8", "2")
    # no more than booted: a plain <vcpu> (libvirt then has no hot-pluggable slot)
    vcpu = pod_domain(_pod(size=VmSize(2, 256), max_vcpus=2)).to_element().find("vcpu")
    assert vcpu is not None and (vcpu.text, vcpu.get("current")) == ("2", None)
    kvm = pod_domain(_pod(accel="kvm")).to_element()
    assert kvm.get("type") == "kvm" and kvm.find("features/tcg") is None
    micro = pod_domain(_pod(machine="microvm", tsc_khz=1234, fs_socket=None)).to_element()
    assert "tsc_early_khz=1234" in (micro.findtext("os/cmdline") or "")
    assert all(
        d.find("address") is not None and d.find("address").get("type") == "virtio-mmio"  # type: ignore[union-attr]
        for d in micro.find("devices")  # type: ignore[union-attr]
        if d.tag in ("rng", "filesystem", "interface")
    )


@pytest.mark.timeout(10)
def test_the_root_image_is_a_read_only_shared_pmem_device() -> None:
    el = pod_domain(_pod(size=VmSize(1, 256), max_vcpus=4, **ROOT_DISK)).to_element()
    assert "criv.root=pmem0" in (el.findtext("os/cmdline") or "")
    assert el.find("devices/disk") is None  # not also a virtio disk
    args = [a.get("value") for a in el.iter(f"{{{QEMU_NS}}}arg")]
    backend = args[args.index("-object") + 1] or ""
    # read-only: no guest can write the file every pod maps; shared: the host's page cache,
    # and left out of a template's state
    assert backend.startswith("memory-backend-file,id=criv-root,")
    assert "readonly=on" in backend.split(",") and "share=on" in backend.split(",")
    assert f"size={72 << 20}" in backend.split(",")
    # room for the one memory device, and the guest NUMA node libvirt then wants, with all
    # vCPUs (booted and hot-pluggable) and the RAM shared with the vhost-user daemons
    mx = el.find("maxMemory")
    assert mx is not None and (mx.text, mx.get("slots")) == (str(256 + 72), "1")
    cell = el.find("cpu/numa/cell")
    assert cell is not None and cell.attrib == {
        "id": "0", "cpus": "0-3", "memory": "256", "unit": "MiB", "memAccess": "shared",
    }  # fmt: skip
    # vm.root_dax false: a read-only virtio disk, no page of it mapped into two VMs
    disk = pod_domain(_pod(root_dax=False, **ROOT_DISK)).to_element()
    assert disk.find("maxMemory") is None and disk.find("cpu/numa") is None
    assert not [a for a in disk.iter(f"{{{QEMU_NS}}}arg") if "pmem" in (a.get("value") or "")]
    assert disk.find("devices/disk/readonly") is not None
    assert "criv.root=vda" in (disk.findtext("os/cmdline") or "")
    # microvm has no PCI: the root stays a virtio disk there
    micro = pod_domain(_pod(machine="microvm", fs_socket=None, **ROOT_DISK)).to_element()
    assert micro.find("maxMemory") is None and micro.find("devices/disk") is not None
    assert "criv.root=vda" in (micro.findtext("os/cmdline") or "")


@pytest.mark.timeout(10)
def test_names_and_args() -> None:
    assert domain_name("ab" * 40) == "criv-" + ("ab" * 40)[:32]
    assert mac_for("x") == mac_for("x") and mac_for("x") != mac_for("y")
    assert mac_for("x").startswith("52:54:00:")
    assert agent_cmdline([]) == ""
    with pytest.raises(InvalidArgument):
        agent_cmdline(["has space"])
    with pytest.raises(InvalidArgument):
        agent_cmdline(["a,b"])
    with pytest.raises(InvalidArgument):
        pod_domain(_pod(vsock_cid=3))


@pytest.mark.timeout(10)
def test_vm_image_domain_boots_its_disk_through_the_firmware() -> None:
    vm = ImageVm(
        sandbox_id="d" * 64, disk=Path("/o.qcow2"), seed=Path("/s.iso"), size=VmSize(2, 512),
        accel="kvm", console_log=Path("/c.log"), machine="microvm",
    )  # fmt: skip
    el = image_domain(vm).to_element()
    assert el.find("os/kernel") is None and el.find("os/boot").get("dev") == "hd"  # type: ignore[union-attr]
    assert el.find("memoryBacking") is None  # no vhost-user device to share memory with
    assert el.find("os/type").get("machine") == "q35"  # type: ignore[union-attr]
    disks = el.findall("devices/disk")
    assert [(d.find("source").get("file"), d.find("driver").get("type")) for d in disks] == [  # type: ignore[union-attr]
        ("/o.qcow2", "qcow2"),
        ("/s.iso", "raw"),
    ]
    assert disks[0].find("readonly") is None and disks[1].find("readonly") is not None
    assert el.find("devices/interface") is None  # no pod netns, no tap
