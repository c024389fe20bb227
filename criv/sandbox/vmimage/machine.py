"""A vm-image pod's VM on the host: its disks and its libvirt domain.

QEMU runs unprivileged (``criv-qemu``, libvirt's ``dynamic_ownership`` off: docs/vm.md)
and criv's image store is private (0700), so what QEMU opens lives under
``<state_dir>/vmimage`` (0711):

- ``bases/<image id>-<disk name>``: the pulled disk, a hard link to the store's unpacked
  file (one copy on disk, shared read-only by every pod of that image; a copy only where
  the store is on another filesystem), group ``criv-qemu``, 0440;
- ``pods/<pod id>/`` (root:criv-qemu 0750): ``overlay-<cid>.qcow2`` (the container's
  writable disk, ``qemu-img create -f qcow2 -F <fmt> -b <base>``, owned by criv-qemu),
  ``overlay-<cid>.base`` (a hard link to its base: the pin that keeps the base while the
  overlay needs it) and ``seed-<cid>.iso`` (the NoCloud seed, read-only to QEMU).

A base whose only link is its own (the store removed the image, no overlay pins it) is
removed by :func:`prune_bases`, when a vm-image pod goes and at criv's start.

The domain (:func:`criv.hypervisor.spec.image_domain`) boots the overlay through the
firmware (SeaBIOS; OVMF for a disk that needs UEFI, :mod:`criv.vmimage.firmware`, with
``vars-<cid>.fd`` beside the overlay, the VM's own copy of OVMF's variable store, owned
by criv-qemu), with the seed as a second virtio disk, the serial console logged
to the container's ``console.log`` and the pod's tap joined to its CNI veth with tc
mirroring exactly as for ``vm`` pods (:mod:`criv.network.tap`).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import logging
import os
import pwd
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from criv.commands import run_command
from criv.config import Config
from criv.errors import FailedPrecondition, Internal
from criv.hypervisor.domain import UefiFirmware
from criv.hypervisor.domaininfo import DomainInfo, DomainStats
from criv.hypervisor.hostsetup import QEMU_USER
from criv.hypervisor.sizing import PodResources, vm_size
from criv.hypervisor.spec import ImageVm, domain_name, image_domain
from criv.network.tap import attach_tap, create_tap, delete_tap, pod_link, tap_name
from criv.sandbox.records import PodRecord
from criv.sandbox.vm.host import VmHost
from criv.vmimage import firmware
from criv.vmimage.containerdisk import disk_format
from criv.vmimage.firmware import Firmware

log = logging.getLogger("criv.sandbox.vmimage")

STOP_EVENT_WAIT = 40  # x 50 ms


@dataclass(frozen=True)
class BaseDisk:
    path: Path
    format: str  # "qcow2" | "raw"
    name: str = ""  # its file name under the image's /disk/


class Booted(NamedTuple):
    name: str
    accel: str
    uuid: str


def _qemu_ids() -> tuple[int, int]:
    return pwd.getpwnam(QEMU_USER).pw_uid, grp.getgrnam(QEMU_USER).gr_gid


def _dir(path: Path, mode: int, gid: int = 0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 0, gid)
    os.chmod(path, mode)


def link_base(root: Path, disk: Path, image_id: str) -> BaseDisk:
    """The store's disk file, reachable by QEMU (blocking: run in a thread)."""
    _, gid = _qemu_ids()
    _dir(root, 0o711)
    _dir(root / "bases", 0o750, gid)
    key = hashlib.sha256(f"{image_id}\0{disk}".encode()).hexdigest()[:32]
    fmt = disk_format(disk)
    dst = root / "bases" / f"{key}.{fmt}"
    if not dst.exists():
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(disk, tmp, follow_symlinks=False)
        except OSError:
            shutil.copyfile(disk, tmp, follow_symlinks=False)
        os.chown(tmp, -1, gid)
        os.chmod(tmp, 0o440)
        os.replace(tmp, dst)
    return BaseDisk(dst, fmt, disk.name)


def pod_dir(root: Path, pod_id: str) -> Path:
    return root / "pods" / pod_id[:32]


def make_pod_dir(root: Path, pod_id: str) -> Path:
    _, gid = _qemu_ids()
    _dir(root, 0o711)
    _dir(root / "pods", 0o711)
    d = pod_dir(root, pod_id)
    _dir(d, 0o750, gid)
    return d


# a base made this recently is not pruned: the pin follows its link within seconds
BASE_PRUNE_GRACE_SECONDS = 60.0


def allocated_bytes(path: Path) -> int:
    """Bytes the file takes on the host's disk (0 if it is gone; blocking)."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def pin_path(overlay: Path) -> Path:
    return overlay.with_suffix(".base")


def prune_bases(root: Path, grace: float = BASE_PRUNE_GRACE_SECONDS) -> list[Path]:
    """Remove the bases nothing links to any more: neither the image store (the image was
    removed) nor an overlay's pin (blocking). Returns what went."""
    gone: list[Path] = []
    now = time.time()
    try:
        entries = list((root / "bases").iterdir())
    except FileNotFoundError:
        return gone
    for p in entries:
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or now - st.st_ctime < grace:
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            gone.append(p)
    return gone


async def make_overlay(base: BaseDisk, overlay: Path) -> None:
    """A qcow2 overlay of ``base`` that QEMU may write, and its pin; the base stays
    read-only."""
    pin = pin_path(overlay)
    for p in (overlay, pin):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    await asyncio.to_thread(os.link, base.path, pin, follow_symlinks=False)
    rc, out = await run_command(
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", base.format, "-b", str(base.path),
        str(overlay),
    )  # fmt: skip
    if rc != 0:
        raise Internal(f"qemu-img create {overlay}: {out.strip()[-500:]}")
    uid, gid = _qemu_ids()
    await asyncio.to_thread(os.chown, overlay, uid, gid)
    await asyncio.to_thread(os.chmod, overlay, 0o600)


def seed_readable(seed: Path) -> None:
    _, gid = _qemu_ids()
    os.chown(seed, 0, gid)
    os.chmod(seed, 0o440)


class Machines:
    """Boots and stops vm-image VMs through the ``vm`` mode's host pieces (libvirt
    connection, KVM probe / TCG fallback, sizing)."""

    def __init__(self, config: Config, host: VmHost, owner: str) -> None:
        self._config = config
        self.host = host
        self._owner = owner

    @property
    def domain_owner(self) -> str:
        """What criv's vm-image domains carry as ``<criv:owner>``."""
        return f"{self._owner}#vm-image"

    async def firmware(self, base: BaseDisk, annotations: dict[str, str]) -> Firmware:
        """The firmware that boots ``base`` (:func:`criv.vmimage.firmware.choose`);
        FAILED_PRECONDITION if it needs UEFI and OVMF is not installed."""
        choice = await firmware.choose(base.path, base.format, annotations)
        if choice.firmware == "uefi":
            vm = self._config.vm
            for path in (vm.uefi_code, vm.uefi_vars):
                if not await asyncio.to_thread(os.path.isfile, path):
                    raise FailedPrecondition(
                        f"disk {base.name or base.path.name} needs UEFI ({choice.why}) and "
                        f"{path} is missing: install OVMF (apt-get install ovmf) or set "
                        "vm.uefi_code and vm.uefi_vars"
                    )
        log.info("disk %s boots with %s: %s", base.name or base.path.name, choice.firmware,
                 choice.why)  # fmt: skip
        return choice.firmware

    async def boot(
        self, pod: PodRecord, disk: Path, seed: Path, console: Path, uefi_vars: Path | None
    ) -> Booted:
        """Start the domain: under OVMF with a fresh ``uefi_vars`` (a copy of OVMF's
        template), else under SeaBIOS."""
        name = domain_name(pod.id)
        accel = self._config.vm.accel
        if accel == "auto":
            await self.host.probed()
            image = await asyncio.to_thread(self.host.guest_image)
            accel = (await self.host.accel(image)).accel
        hv = await self.host.hypervisor()
        tap, mac, mtu = "", "", 0
        if pod.netns:
            tap = tap_name(pod.id)
            await self._delete_pod_tap(pod)  # a previous container's
            await create_tap(tap, self._owner)
            link = await pod_link(Path(pod.netns))
            mac, mtu = link.mac, link.mtu
        size = vm_size(
            PodResources(**pod.resources),
            self._config.vm.vcpus,
            self._config.vm.memory_mib,
            os.cpu_count() or 1,
        )
        uefi = None
        if uefi_vars is not None:
            await asyncio.to_thread(self._fresh_vars, uefi_vars)
            uefi = UefiFirmware(Path(self._config.vm.uefi_code), uefi_vars)
        vm = ImageVm(
            sandbox_id=pod.id, disk=disk, seed=seed, size=size,
            accel="kvm" if accel == "kvm" else "tcg", console_log=console, tap=tap, mac=mac,
            mtu=mtu, machine=self._config.vm.machine, owner=self.domain_owner, uefi=uefi,
        )  # fmt: skip
        self.host.stops.pop(name, None)
        try:
            info = await hv.create(image_domain(vm))
            if tap:
                await attach_tap(Path(pod.netns), tap)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.destroy(pod))
            raise
        return Booted(name, vm.accel, info.uuid)

    def _fresh_vars(self, dst: Path) -> None:
        """OVMF's variable store template copied for one VM, writable by QEMU only
        (blocking). Written beside, then renamed: ``dst``'s directory is criv's, never
        the guest's, and a file left there is replaced, not written through."""
        uid, gid = _qemu_ids()
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        shutil.copyfile(self._config.vm.uefi_vars, tmp, follow_symlinks=True)
        os.chown(tmp, uid, gid)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dst)

    async def lookup(self, pod: PodRecord) -> DomainInfo | None:
        """The pod's domain as libvirt has it (None: none runs)."""
        hv = await self.host.hypervisor()
        return await hv.lookup(domain_name(pod.id))

    async def wait_stopped(self, pod: PodRecord) -> str:
        """Wait until the VM is gone; why libvirt saw it stop ("shutdown", "destroyed",
        "crashed", ...)."""
        name = domain_name(pod.id)
        hv = await self.host.hypervisor()
        await hv.wait_stopped(name)
        for _ in range(STOP_EVENT_WAIT):  # the lifecycle event may come after the lookup
            if name in self.host.stops:
                break
            await asyncio.sleep(0.05)
        return self.host.stops.get(name, "gone")

    async def shutdown(self, pod: PodRecord, timeout: float) -> str:
        """ACPI power button, ``timeout`` s, then destroy: "gone", "shutdown", "destroyed"."""
        hv = await self.host.hypervisor()
        return await hv.shutdown(domain_name(pod.id), timeout)

    async def console_pty(self, pod: PodRecord) -> str:
        """The host pty of the VM's serial console (attach)."""
        hv = await self.host.hypervisor()
        return await hv.console_pty(domain_name(pod.id))

    async def stats(self, pod: PodRecord) -> DomainStats | None:
        hv = await self.host.hypervisor()
        return await hv.stats(domain_name(pod.id))

    async def destroy(self, pod: PodRecord) -> None:
        hv = await self.host.hypervisor()
        name = domain_name(pod.id)
        await hv.destroy(name)
        await hv.wait_stopped(name, 10.0)
        await delete_tap(tap_name(pod.id))  # only if it never reached the pod netns
        await self._delete_pod_tap(pod)

    async def _delete_pod_tap(self, pod: PodRecord) -> None:
        """A stopped VM's tap stays in the pod netns (persistent): the next boot remakes it."""
        if pod.netns and Path(pod.netns).exists():
            await run_command(
                "nsenter", f"--net={pod.netns}", "ip", "link", "del", "dev", tap_name(pod.id)
            )
