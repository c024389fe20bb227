"""What vm pods need of the host, found once and shared by every pod: the libvirt
connection (and why each domain stopped), the guest image, KVM or TCG (a probe that
boots something), and whether libvirt's qemu.conf is set up for criv."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from criv.config import Config
from criv.errors import FailedPrecondition
from criv.guestimage import DEFAULT_CACHE_ROOT, cached_image
from criv.hypervisor.driver import Hypervisor
from criv.hypervisor.hostsetup import host_mount_issues, qemu_conf_issues
from criv.hypervisor.kvm import AccelChoice, choose_accel
from criv.state.runtime_state import RuntimeState

log = logging.getLogger("criv.sandbox.vm")

VSOCK_DESCRIPTION = "userspace vhost-user-vsock backend (python -m criv.vsock), one per VM"


class VmHost:
    def __init__(self, config: Config, runtime_state: RuntimeState) -> None:
        self._config = config
        self._state = runtime_state
        self._hv: Hypervisor | None = None
        self._hv_lock = asyncio.Lock()
        self._accel: AccelChoice | None = None
        self._accel_lock = asyncio.Lock()  # pods booting together probe once
        self.stops: dict[str, str] = {}  # domain name -> why libvirt saw it stop
        self._publish()

    def _publish(self) -> None:
        accel = self._accel
        self._state.publish(
            "vm",
            {
                "accel": accel.accel if accel else "not probed yet (at the first vm pod)",
                "accelReason": accel.reason if accel else "",
                "vsock": VSOCK_DESCRIPTION,
                "libvirtUri": self._config.vm.libvirt_uri,
                "machine": self._config.vm.machine,
            },
        )

    async def hypervisor(self) -> Hypervisor:
        async with self._hv_lock:
            if self._hv is None:
                vm = self._config.vm
                hv = Hypervisor(vm.libvirt_uri, call_timeout=vm.libvirt_call_timeout_seconds)
                await hv.connect()
                hv.add_stop_listener(self._on_stop)
                self._hv = hv
            return self._hv

    def _on_stop(self, name: str, reason: str) -> None:
        self.stops[name] = reason
        if reason != "shutdown":
            log.warning("domain %s stopped: %s", name, reason)

    async def preflight(self) -> None:
        if self._config.vm.vsock == "kernel":
            raise FailedPrecondition(
                "vm.vsock=kernel is not supported yet; use auto or backend (userspace backend)"
            )
        issues = await asyncio.to_thread(lambda: qemu_conf_issues() + host_mount_issues())
        if issues:
            raise FailedPrecondition(
                "this host is not set up for vm pods (" + "; ".join(issues)
                + "): run `criv doctor --fix`, then restart libvirtd"
            )  # fmt: skip

    def guest_image(self) -> tuple[Path, Path]:
        """(kernel, initrd): ``vm.kernel``/``vm.initrd`` or the cached guest image."""
        vm = self._config.vm
        if vm.kernel:
            return Path(vm.kernel), Path(vm.initrd)
        cache = Path(vm.guest_image_cache) if vm.guest_image_cache else None
        cache = cache or Path(self._config.state_dir) / "cache" / "guest-image"
        img = cached_image(cache) or (
            cached_image(DEFAULT_CACHE_ROOT) if cache != DEFAULT_CACHE_ROOT else None
        )
        if img is None:
            raise FailedPrecondition(
                f"no guest image for this criv in {cache}: run `criv image build` "
                "(or set vm.kernel and vm.initrd)"
            )
        return img.kernel, img.initrd

    async def accel(self, kernel: Path, initrd: Path) -> AccelChoice:
        async with self._accel_lock:
            if self._accel is None:
                probe = Path(self._config.run_dir) / "kvm-probe.json"
                self._accel = await asyncio.to_thread(
                    choose_accel, self._config.vm.accel, probe, kernel, initrd
                )
                self._publish()
            return self._accel

    async def close(self) -> None:
        if self._hv is not None:
            await self._hv.close()
            self._hv = None
