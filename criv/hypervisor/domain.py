"""libvirt domain XML from small typed objects. No policy here: sizes, devices and paths are
chosen by the caller (see :mod:`criv.hypervisor.spec` and :mod:`criv.hypervisor.sizing`).

The XML is deterministic (fixed element and attribute order) so it can be compared with the
golden files under tests/unit/hypervisor/golden/.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
CRIV_NS = "https://criv.dev/xmlns/domain/1"
DOMAIN_PREFIX = "criv-"
# PCI slot of the vhost-user-vsock device on the root bus; far above what libvirt allocates
VSOCK_PCI_SLOT = 0x10
# and of the guest root's virtio-pmem device, beside it
PMEM_PCI_SLOT = 0x11
MIB = 1 << 20

Machine = Literal["q35", "microvm", "pc"]
DomainType = Literal["kvm", "qemu"]  # libvirt's names: "qemu" means TCG


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _mmio(el: ET.Element, machine: Machine) -> None:
    # microvm has no PCI: libvirt wants every virtio device placed on virtio-mmio explicitly
    if machine == "microvm":
        _sub(el, "address", type="virtio-mmio")


def _place(el: ET.Element, machine: Machine, bus: int | None) -> None:
    """Where a device goes: an explicit PCIe root port (``bus``, a hot-plug into a free port)
    or wherever libvirt puts it."""
    if bus is not None:
        _sub(el, "address", type="pci", domain="0x0000", bus=f"{bus:#04x}", slot="0x00",
             function="0x0")  # fmt: skip
    else:
        _mmio(el, machine)


def device_xml(device: Device, machine: Machine = "q35") -> str:
    """One device's XML, as libvirt's attachDevice takes it (a hot-plug)."""
    holder = ET.Element("devices")
    device.to_element(holder, machine)
    return ET.tostring(holder[0], encoding="unicode")


@dataclass(frozen=True)
class DirectBoot:
    """PVH direct boot of an uncompressed vmlinux (no firmware, no decompression)."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class UefiFirmware:
    """OVMF: its code, mapped read-only, and this VM's own UEFI variable store (a copy of
    OVMF's template that QEMU may write; libvirt is not asked to make it)."""

    code: Path
    vars: Path


@dataclass(frozen=True)
class FirmwareBoot:
    """Boot from the first disk through the firmware, as a disk image with its own
    bootloader needs: SeaBIOS (libvirt's default) or, with ``uefi``, OVMF. The firmware
    speaks on the serial console (``-machine graphics=off``: SeaBIOS's sercon; OVMF's
    serial terminal; there is no display), so a disk that does not boot says so in the
    console log. SeaBIOS resets at once after a failed boot (``rebootTimeout='0'``), which
    ends the domain (``on_reboot=destroy``); OVMF waits in its boot manager instead."""

    uefi: UefiFirmware | None = None
    QEMU_ARGS = ("-machine", "graphics=off")


@dataclass(frozen=True)
class Disk:
    """A virtio disk backed by a host file (``format``: qcow2 or raw); ``readonly`` for a
    seed the guest must not change."""

    path: Path
    target: str
    format: str = "qcow2"
    readonly: bool = False

    def to_element(self, parent: ET.Element, machine: Machine) -> None:
        disk = _sub(parent, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type=self.format)
        _sub(disk, "source", file=str(self.path))
        _sub(disk, "target", dev=self.target, bus="virtio")
        if self.readonly:
            _sub(disk, "readonly")
        _mmio(disk, machine)


@dataclass(frozen=True)
class SerialLog:
    """The serial console (ttyS0) on a pty (``virsh console``), logged to a file on the
    host through virtlogd, which caps it (rotates at its ``max_size``, keeps
    ``max_backups``): the guest decides how much it writes, not how much disk it takes."""

    path: Path

    def to_element(self, parent: ET.Element, machine: Machine) -> None:
        serial = _sub(parent, "serial", type="pty")
        _sub(serial, "log", file=str(self.path), append="on")
        _sub(serial, "target", port="0")


@dataclass(frozen=True)
class Rng:
    """virtio-rng: without it Python blocks seconds in getrandom at guest boot."""

    source: str = "/dev/urandom"

    def to_element(self, parent: ET.Element, machine: Machine) -> None:
        rng = _sub(parent, "rng", model="virtio")
        _sub(rng, "backend", self.source, model="random")
        _mmio(rng, machine)


@dataclass(frozen=True)
class VirtioFs:
    """virtio-fs from a virtiofsd that criv runs (``socket``); the guest mounts it by
    ``tag``. QEMU itself touches no host file of the share, so it needs no privilege."""

    socket: Path
    tag: str = "criv"
    queue_size: int = 1024
    bus: int | None = None  # a PCIe root port's bus, for a hot-plug

    def to_element(self, parent: ET.Element, machine: Machine) -> None:
        fs = _sub(parent, "filesystem", type="mount")
        _sub(fs, "driver", type="virtiofs", queue=str(self.queue_size))
        _sub(fs, "source", socket=str(self.socket))
        _sub(fs, "target", dir=self.tag)
        _place(fs, machine, self.bus)


@dataclass(frozen=True)
class TapInterface:
    """An existing tap (created and later moved into the pod netns by the network layer)."""

    tap: str
    mac: str
    mtu: int = 0
    bus: int | None = None  # a PCIe root port's bus, for a hot-plug

    def to_element(self, parent: ET.Element, machine: Machine) -> None:
        iface = _sub(parent, "interface", type="ethernet")
        _sub(iface, "mac", address=self.mac)
        _sub(iface, "target", dev=self.tap, managed="no")
        _sub(iface, "model", type="virtio")
        if self.mtu:
            _sub(iface, "mtu", size=str(self.mtu))
        _place(iface, machine, self.bus)


@dataclass(frozen=True)
class KernelVsock:
    """vhost-vsock in the host kernel (needs /dev/vhost-vsock)."""

    cid: int

    def to_element(self, parent: ET.Element, machine: Machine) -> None:
        vs = _sub(parent, "vsock", model="virtio")
        _sub(vs, "cid", auto="no", address=str(self.cid))
        _mmio(vs, machine)


@dataclass(frozen=True)
class VhostUserVsock:
    """criv's userspace vsock backend, attached as ``vhost-user-vsock-*`` via qemu args.

    libvirt 9.0 has no element for it. The backend reports the guest CID (GET_CONFIG), and
    vhost-user needs guest memory shared (memfd) so the backend can map it.
    """

    socket: Path
    id: str = "vsock0"

    def qemu_args(self, machine: Machine) -> list[str]:
        if machine == "microvm":
            dev = "vhost-user-vsock-device"
        else:
            # libvirt does not know this device, so it hands out PCI slots from 1 up (root
            # ports for the NIC, 9p, rng) as if the slot QEMU would pick were free: pin ours
            bus = "pcie.0" if machine == "q35" else "pci.0"
            dev = f"vhost-user-vsock-pci,bus={bus},addr={VSOCK_PCI_SLOT:#x}"
        return [
            "-chardev",
            f"socket,id={self.id},path={self.socket}",
            "-device",
            f"{dev},chardev={self.id}",
        ]

    def hotplug_commands(self, bus: int) -> list[dict[str, object]]:
        """The QMP commands that hot-plug it into the PCIe root port of ``bus`` (libvirt
        names that port ``pci.<bus>``)."""
        addr = {"type": "unix", "data": {"path": str(self.socket)}}
        return [
            {"execute": "chardev-add", "arguments": {"id": self.id, "backend": {
                "type": "socket", "data": {"addr": addr, "server": False}}}},
            {"execute": "device_add", "arguments": {
                "driver": "vhost-user-vsock-pci", "id": f"{self.id}dev", "chardev": self.id,
                "bus": f"pci.{bus}"}},
        ]  # fmt: skip


@dataclass(frozen=True)
class ReadOnlyPmem:
    """A host file as a read-only virtio-pmem device: the guest maps its pages (DAX) instead
    of copying them into its own RAM, and every VM maps the same host page cache.

    libvirt 9.0 cannot make a virtio-pmem device read-only (its ``<readonly/>`` is for
    nvdimm only): QEMU would open the file for writing and map it shared, so one guest could
    change what every pod maps. So QEMU gets it through its own arguments: the file opened
    and mapped read-only (``readonly=on``: QEMU drops a guest's writes to it) and shared
    (``share=on``, which also keeps it out of a template's saved state: ``x-ignore-shared``).
    A memory device needs hot-pluggable memory room (``maxMemory``, which the Domain adds).
    """

    path: Path
    size: int  # bytes: the whole file, a multiple of the page size
    id: str = "criv-root"

    @property
    def size_mib(self) -> int:
        return -(-self.size // MIB)

    def qemu_args(self, machine: Machine) -> list[str]:
        path = str(self.path).replace(",", ",,")  # QEMU's option escaping
        bus = "pcie.0" if machine == "q35" else "pci.0"
        return [
            "-object", f"memory-backend-file,id={self.id},mem-path={path},share=on,"
            f"readonly=on,size={self.size}",
            "-device", f"virtio-pmem-pci,memdev={self.id},id={self.id}-pmem,bus={bus},"
            f"addr={PMEM_PCI_SLOT:#x}",
        ]  # fmt: skip


Device = SerialLog | Rng | VirtioFs | TapInterface | KernelVsock | Disk


@dataclass(frozen=True)
class Domain:
    name: str
    uuid: str
    boot: DirectBoot | FirmwareBoot
    vcpus: int = 1
    # most vCPUs: above ``vcpus``, the rest are hot-pluggable slots (``<vcpu current=…>``)
    max_vcpus: int = 0
    # most memory; the balloon holds back all above ``current_memory_mib`` (0: none)
    memory_mib: int = 256
    current_memory_mib: int = 0
    # a virtio balloon (resize live), with free page reporting (freed guest pages go back)
    balloon: bool = False
    free_page_reporting: bool = False
    type: DomainType = "qemu"
    machine: Machine = "q35"
    devices: tuple[Device, ...] = ()
    vhost_user_vsock: VhostUserVsock | None = None
    # the guest root's image (not on microvm: no PCI there)
    root_pmem: ReadOnlyPmem | None = None
    # TCG translation cache cap (QEMU's default scales with RAM and dominates RSS)
    tb_cache_mib: int = 0
    # memfd + shared: required by vhost-user devices (vsock backend, virtiofsd map it)
    shared_memory: bool = True
    # q35: this many empty PCIe root ports beyond those libvirt adds, for hot-plugs, by
    # ACPI (criv's guest kernel has acpiphp: pciehp waits 120 ms per slot for the link)
    hotplug_ports: int = 0
    # QEMU waits for a migration stream (``-incoming defer``): a template's clone
    incoming: bool = False
    metadata: dict[str, str] = field(default_factory=dict)

    def to_element(self) -> ET.Element:
        ET.register_namespace("qemu", QEMU_NS)
        ET.register_namespace("criv", CRIV_NS)
        dom = ET.Element("domain", type=self.type)
        _sub(dom, "name", self.name)
        _sub(dom, "uuid", self.uuid)
        if self.metadata:
            md = _sub(dom, "metadata")
            pod = _sub(md, f"{{{CRIV_NS}}}pod")
            for k, v in sorted(self.metadata.items()):
                _sub(pod, f"{{{CRIV_NS}}}{k}", v)
        if self.root_pmem is not None:
            # room for the one memory device; libvirt then wants a guest NUMA node (below)
            most = self.memory_mib + self.root_pmem.size_mib
            _sub(dom, "maxMemory", str(most), slots="1", unit="MiB")
        _sub(dom, "memory", str(self.memory_mib), unit="MiB")
        if 0 < self.current_memory_mib < self.memory_mib:
            _sub(dom, "currentMemory", str(self.current_memory_mib), unit="MiB")
        if self.shared_memory:
            mb = _sub(dom, "memoryBacking")
            _sub(mb, "source", type="memfd")
            _sub(mb, "access", mode="shared")
        if self.max_vcpus > self.vcpus:
            _sub(dom, "vcpu", str(self.max_vcpus), placement="static", current=str(self.vcpus))
        else:
            _sub(dom, "vcpu", str(self.vcpus), placement="static")
        os_el = _sub(dom, "os")
        _sub(os_el, "type", "hvm", arch="x86_64", machine=self.machine)
        if isinstance(self.boot, FirmwareBoot) and self.boot.uefi is not None:
            _sub(os_el, "loader", str(self.boot.uefi.code), readonly="yes", type="pflash")
            _sub(os_el, "nvram", str(self.boot.uefi.vars))
            _sub(os_el, "boot", dev="hd")
        elif isinstance(self.boot, FirmwareBoot):
            _sub(os_el, "boot", dev="hd")
            _sub(os_el, "bios", rebootTimeout="0")
        else:
            _sub(os_el, "kernel", str(self.boot.kernel))
            if self.boot.initrd is not None:
                _sub(os_el, "initrd", str(self.boot.initrd))
            if self.boot.cmdline:
                _sub(os_el, "cmdline", self.boot.cmdline)
        feats = _sub(dom, "features")
        if self.machine != "microvm":
            _sub(feats, "acpi")
        if self.type == "qemu" and self.tb_cache_mib:
            tcg = _sub(feats, "tcg")
            _sub(tcg, "tb-cache", str(self.tb_cache_mib), unit="MiB")
        if self.type == "kvm":
            cpu = _sub(dom, "cpu", mode="host-passthrough")
        else:
            # TCG's "max" model: x86-64-v2+ features that images built for newer CPUs need
            cpu = _sub(dom, "cpu", mode="maximum", migratable="off")
        if self.root_pmem is not None:
            last = max(self.max_vcpus, self.vcpus) - 1
            shared = {"memAccess": "shared"} if self.shared_memory else {}
            cell = {"id": "0", "cpus": f"0-{last}" if last else "0", "memory": str(self.memory_mib)}
            _sub(_sub(cpu, "numa"), "cell", **cell, unit="MiB", **shared)
        _sub(dom, "clock", offset="utc")
        _sub(dom, "on_poweroff", "destroy")
        _sub(dom, "on_reboot", "destroy")
        _sub(dom, "on_crash", "destroy")
        devs = _sub(dom, "devices")
        _sub(devs, "controller", type="usb", model="none")
        if self.hotplug_ports and self.machine == "q35":
            _sub(devs, "controller", type="pci", index="0", model="pcie-root")
            for i in range(1, self.hotplug_ports + 1):
                _sub(devs, "controller", type="pci", index=str(i), model="pcie-root-port")
        for d in self.devices:
            d.to_element(devs, self.machine)
        if self.balloon:
            fpr = {"freePageReporting": "on"} if self.free_page_reporting else {}
            _mmio(_sub(devs, "memballoon", model="virtio", **fpr), self.machine)
        else:
            _sub(devs, "memballoon", model="none")
        args = (
            [] if self.vhost_user_vsock is None else self.vhost_user_vsock.qemu_args(self.machine)
        )
        if self.root_pmem is not None:
            args += self.root_pmem.qemu_args(self.machine)
        if isinstance(self.boot, FirmwareBoot):
            args += FirmwareBoot.QEMU_ARGS
        if self.hotplug_ports and self.machine == "q35":
            args += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=on"]
        if self.incoming:
            args += ["-incoming", "defer"]
        if args:
            cl = _sub(dom, f"{{{QEMU_NS}}}commandline")
            for arg in args:
                _sub(cl, f"{{{QEMU_NS}}}arg", value=arg)
        return dom

    def to_xml(self) -> str:
        el = self.to_element()
        ET.indent(el, space="  ")
        return ET.tostring(el, encoding="unicode") + "\n"
