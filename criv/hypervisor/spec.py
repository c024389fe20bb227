"""Policy: which domain a pod gets. Assembles :class:`~criv.hypervisor.domain.Domain` objects.

Kept apart from domain.py (pure XML) so device choices are decided and tested in one place.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from criv.errors import InvalidArgument
from criv.hypervisor.domain import (
    DOMAIN_PREFIX,
    DirectBoot,
    Disk,
    Domain,
    FirmwareBoot,
    KernelVsock,
    Machine,
    ReadOnlyPmem,
    Rng,
    SerialLog,
    TapInterface,
    UefiFirmware,
    VhostUserVsock,
    VirtioFs,
)
from criv.hypervisor.sizing import VmSize, tb_cache_mib

Accel = Literal["kvm", "tcg"]

# the pod's virtio-fs share: the guest mounts it by this tag (images/init, the agent)
SHARE_TAG = "criv"
# quiet: every console byte is an emulated UART write under TCG; panic=-1 + on_crash=destroy
# ends a wedged guest at once; reboot=t makes a guest reboot end the domain (on_reboot=destroy).
BASE_CMDLINE = ("console=ttyS0", "quiet", "panic=-1", "reboot=t")
_SAFE_ARG = re.compile(r"^[A-Za-z0-9_./:=@+-]*$")
# the guest root's read-only image (criv.guestimage.rootdisk): a pod VM's only virtio-pmem
# device, so the guest names it pmem0 (images/early-init mounts what ``criv.root=`` names,
# with DAX); with vm.root_dax off, or on microvm (no PCI), its only virtio disk, vda
ROOT_DISK_CMDLINE = "criv.root=pmem0"
ROOT_DISK_TARGET = "vda"
ROOT_DISK_CMDLINE_BLK = f"criv.root={ROOT_DISK_TARGET}"


def root_pmem(path: Path, size: int) -> ReadOnlyPmem:
    """The guest root image as a read-only virtio-pmem device of the file's ``size``."""
    if size <= 0:
        raise InvalidArgument(f"the guest root image {path}: its size is needed")
    return ReadOnlyPmem(path, size)


def root_disk_qemu_args(path: Path, memory_mib: int) -> list[str]:
    """Raw QEMU's arguments for the guest root image as a pod's domain has it (read-only
    virtio-pmem; the kernel command line then needs ``ROOT_DISK_CMDLINE``) in a q35 VM of
    ``memory_mib`` (QEMU merges this ``-m`` with the caller's): the KVM probe's guest, the
    benchmarks' floor and the image's boot tests."""
    pmem = root_pmem(path, path.stat().st_size)
    return ["-m", f"slots=1,maxmem={memory_mib + pmem.size_mib}M", *pmem.qemu_args("q35")]


def domain_name(sandbox_id: str) -> str:
    """criv's domain name for a sandbox (libvirt names are unique per host)."""
    return DOMAIN_PREFIX + sandbox_id[:32]


def agent_cmdline(args: list[str]) -> str:
    """``criv.agent_args=`` for the guest init: comma-joined, no spaces or commas inside."""
    for a in args:
        if not _SAFE_ARG.match(a):
            raise InvalidArgument(f"agent argument {a!r} cannot go on the kernel command line")
    return "criv.agent_args=" + ",".join(args) if args else ""


def host_tsc_khz() -> int:
    """The host TSC frequency in kHz (microvm under TCG needs it: ``tsc_early_khz``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass(frozen=True)
class PodVm:
    """What the sandbox layer knows about the VM it wants."""

    sandbox_id: str
    kernel: Path
    initrd: Path
    size: VmSize
    accel: Accel
    console_log: Path
    root_disk: Path | None = None  # the guest root, read-only (None: in the initramfs)
    root_disk_bytes: int = 0  # its size (the whole file is the guest's pmem device)
    root_dax: bool = True  # the root disk on virtio-pmem with DAX (False: a virtio disk)
    max_vcpus: int = 0  # above size.vcpus: hot-pluggable vCPU slots (sizing.max_vcpus_for)
    max_memory_mib: int = 0  # above size.memory_mib: held back by the balloon (max_memory_for)
    free_page_reporting: bool = True
    fs_socket: Path | None = None  # virtiofsd serving the pod's share
    tap: str = ""
    mac: str = ""
    mtu: int = 0
    vsock_socket: Path | None = None  # userspace backend (vhost-user)
    vsock_cid: int = 0  # kernel vhost-vsock
    machine: Machine = "q35"
    agent_args: list[str] = field(default_factory=list)
    extra_cmdline: tuple[str, ...] = ()
    uuid: str = ""
    tsc_khz: int = 0
    # which criv made it (its state dir): a restarted criv collects only its own domains
    owner: str = ""
    # templating (criv.sandbox.vm.template): empty root ports for the devices a clone gets
    # hot-plugged; ``incoming``: the domain waits for a template's state
    hotplug_ports: int = 0
    incoming: bool = False
    name: str = ""  # instead of the sandbox's domain name (a template's)


# A template and its clones: libvirt puts the rng and the balloon on root ports (the root
# image's pmem device is on the root bus); the share, the NIC and the vsock device are
# hot-plugged into a clone's free ports.
TEMPLATE_HOTPLUG_PORTS = 6
TEMPLATE_DOMAIN_PREFIX = DOMAIN_PREFIX + "tmpl-"


def template_shape(vm: PodVm) -> PodVm:
    """``vm`` without what is the pod's own (share, NIC, vsock, names, console): what a
    template boots as, and what its clones start as before their devices are hot-plugged."""
    return replace(
        vm, sandbox_id="", fs_socket=None, tap="", mac="", mtu=0, vsock_socket=None,
        vsock_cid=0, uuid="", owner="", hotplug_ports=TEMPLATE_HOTPLUG_PORTS, name="",
        console_log=Path("/dev/null"),
    )  # fmt: skip


def pod_domain(vm: PodVm) -> Domain:
    if vm.vsock_socket is not None and vm.vsock_cid:
        raise InvalidArgument("choose one vsock transport: backend socket or kernel CID")
    if vm.machine == "microvm" and vm.fs_socket is not None:
        # measured: the guest's first write to a virtio-fs share over virtio-mmio hangs
        # (QEMU 7.2, TCG); pods need the share, so they need q35
        raise InvalidArgument("no virtio-fs share on microvm here: use machine q35")
    cmdline = list(BASE_CMDLINE)
    if vm.machine == "microvm":
        # no PCI and no ACPI tables on microvm (devices come as virtio_mmio.device= args):
        # skip probing for them
        cmdline += ["acpi=off", "pci=off"]
        if vm.accel == "tcg":
            # TSC calibration hangs under TCG on microvm (no PIT/HPET calibration source)
            cmdline.append(f"tsc_early_khz={vm.tsc_khz or host_tsc_khz()}")
    pmem = None
    if vm.root_disk is not None and vm.root_dax and vm.machine != "microvm":
        pmem = root_pmem(vm.root_disk, vm.root_disk_bytes)
        cmdline.append(ROOT_DISK_CMDLINE)
    elif vm.root_disk is not None:
        cmdline.append(ROOT_DISK_CMDLINE_BLK)
    if a := agent_cmdline(vm.agent_args):
        cmdline.append(a)
    cmdline += vm.extra_cmdline
    devices: list[SerialLog | Rng | Disk | VirtioFs | TapInterface | KernelVsock] = [
        SerialLog(vm.console_log),
        Rng(),
    ]
    if vm.root_disk is not None and pmem is None:
        devices.append(Disk(vm.root_disk, ROOT_DISK_TARGET, "raw", readonly=True))
    if vm.fs_socket is not None:
        devices.append(VirtioFs(vm.fs_socket, tag=SHARE_TAG))
    if vm.tap:
        devices.append(TapInterface(vm.tap, vm.mac or mac_for(vm.sandbox_id), vm.mtu))
    if vm.vsock_cid:
        devices.append(KernelVsock(vm.vsock_cid))
    name = vm.name or domain_name(vm.sandbox_id)
    uuid = vm.uuid or str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, "criv:" + (vm.sandbox_id or name)))
    return Domain(
        name=name,
        uuid=uuid,
        boot=DirectBoot(vm.kernel, vm.initrd, " ".join(cmdline)),
        vcpus=vm.size.vcpus,
        # microvm has no ACPI here (acpi=off): nothing could announce a hot-plugged vCPU
        max_vcpus=vm.max_vcpus if vm.machine != "microvm" else 0,
        memory_mib=max(vm.max_memory_mib, vm.size.memory_mib),
        current_memory_mib=vm.size.memory_mib,
        balloon=True,
        free_page_reporting=vm.free_page_reporting,
        type="kvm" if vm.accel == "kvm" else "qemu",
        machine=vm.machine,
        devices=tuple(devices),
        vhost_user_vsock=VhostUserVsock(vm.vsock_socket) if vm.vsock_socket else None,
        root_pmem=pmem,
        tb_cache_mib=tb_cache_mib(vm.size.memory_mib, vm.incoming) if vm.accel == "tcg" else 0,
        shared_memory=True,
        hotplug_ports=vm.hotplug_ports,
        incoming=vm.incoming,
        metadata={
            **({"sandbox": vm.sandbox_id} if vm.sandbox_id else {"template": name}),
            **({"owner": vm.owner} if vm.owner else {}),
        },
    )


def mac_for(sandbox_id: str) -> str:
    """A stable locally administered MAC (52:54:00 is QEMU's OUI) from the sandbox id."""
    h = uuidlib.uuid5(uuidlib.NAMESPACE_URL, "criv-mac:" + sandbox_id).bytes
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


@dataclass(frozen=True)
class ImageVm:
    """A ``vm-image`` pod's VM: its own disk (a per-pod overlay) booted by the firmware,
    a NoCloud seed as a second, read-only disk, the pod's tap; no agent, no share."""

    sandbox_id: str
    disk: Path
    seed: Path
    size: VmSize
    accel: Accel
    console_log: Path
    tap: str = ""
    mac: str = ""
    mtu: int = 0
    machine: Machine = "q35"
    owner: str = ""
    uefi: UefiFirmware | None = None  # None: SeaBIOS


def image_domain(vm: ImageVm) -> Domain:
    devices: tuple[SerialLog | Rng | TapInterface | Disk, ...] = (
        SerialLog(vm.console_log),
        Rng(),
        Disk(vm.disk, "vda", "qcow2"),
        Disk(vm.seed, "vdb", "raw", readonly=True),
    )
    if vm.tap:
        devices += (TapInterface(vm.tap, vm.mac or mac_for(vm.sandbox_id), vm.mtu),)
    return Domain(
        name=domain_name(vm.sandbox_id),
        uuid=str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, "criv:" + vm.sandbox_id)),
        boot=FirmwareBoot(vm.uefi),
        vcpus=vm.size.vcpus,
        memory_mib=vm.size.memory_mib,
        type="kvm" if vm.accel == "kvm" else "qemu",
        machine=vm.machine if vm.machine != "microvm" else "q35",  # SeaBIOS needs a PC
        devices=devices,
        tb_cache_mib=tb_cache_mib(vm.size.memory_mib) if vm.accel == "tcg" else 0,
        shared_memory=False,  # no vhost-user device maps its memory
        metadata={"sandbox": vm.sandbox_id, **({"owner": vm.owner} if vm.owner else {})},
    )
