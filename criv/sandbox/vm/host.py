"""What vm pods need of the host, found once and shared by every pod: the libvirt
connection (and why each domain stopped), the guest image, KVM or TCG (a probe that
boots something), and whether libvirt's qemu.conf is set up for criv.

The slow findings (the KVM probe, libvirtd's probe of QEMU's capabilities: seconds after
libvirtd starts) are made at criv's start-up, in the background (:meth:`VmHost.start_probes`),
so that the first pod does not wait for them unless it comes while they still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from criv.config import Config
from criv.errors import CrivError, FailedPrecondition
from criv.guestimage import DEFAULT_CACHE_ROOT, GuestImage, cached_image
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
        self._probes: asyncio.Task[None] | None = None
        self.stops: dict[str, str] = {}  # domain name -> why libvirt saw it stop
        self._publish()

    def _publish(self) -> None:
        accel = self._accel
        probing = self._probes is not None and not self._probes.done()
        pending = "probing (criv's start-up)" if probing else "not probed yet (at the first vm pod)"
        self._state.publish(
            "vm",
            {
                "accel": accel.accel if accel else pending,
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
        # a pod VM ends itself with a reset (criv-poweroff's emergency restart; reboot=t,
        # on_reboot=destroy), or with a shutdown from the ACPI button; a guest panic
        # (panic=-1) resets too, and says so on the console
        if reason not in ("shutdown", "reset"):
            log.warning("domain %s stopped: %s", name, reason)

    async def settle_stop(self, name: str, timeout: float = 5.0) -> None:
        """Wait for the stop event of a domain that was just destroyed (libvirt delivers it
        on its own thread, maybe after the destroy returned), then forget it: a domain of
        the same name started next must not be taken for stopped."""
        deadline = time.monotonic() + timeout
        while name not in self.stops and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.stops.pop(name, None)

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

    def guest_image(self) -> GuestImage:
        """``vm.kernel``/``vm.initrd`` (the root in that initramfs) or the cached guest
        image (its root on a read-only disk)."""
        vm = self._config.vm
        if vm.kernel:
            disk = Path(vm.root_disk) if vm.root_disk else None
            return GuestImage(Path(vm.kernel), Path(vm.initrd), hash="", root_disk=disk)
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
        return img

    async def accel(self, image: GuestImage) -> AccelChoice:
        async with self._accel_lock:
            if self._accel is None:
                probe = Path(self._config.run_dir) / "kvm-probe.json"
                self._accel = await asyncio.to_thread(
                    choose_accel,
                    self._config.vm.accel,
                    probe,
                    image.kernel,
                    image.initrd,
                    root_disk=image.root_disk,
                )
                self._publish()
            return self._accel

    # -- start-up probes ------------------------------------------------------------

    def start_probes(self) -> None:
        """Start the start-up probes as a background task (needs a running loop; without
        one, as in tools and unit tests, the first pod probes)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._probes = loop.create_task(self._run_probes(), name="criv-vm-startup-probes")
        self._publish()

    async def _run_probes(self) -> None:
        t0 = time.monotonic()
        found: list[str] = []

        async def libvirt_caps() -> None:
            try:
                hv = await self.hypervisor()
                await hv.probe_capabilities()
                found.append(f"libvirt's QEMU capabilities {time.monotonic() - t0:.2f}s")
            except CrivError as e:  # the first pod meets it again, and says so
                log.warning("start-up probe: libvirt: %s", e)

        async def kvm() -> None:
            try:
                image = await asyncio.to_thread(self.guest_image)
            except FailedPrecondition:
                return  # no guest image yet: its kernel is part of the probe
            choice = await self.accel(image)
            found.append(f"accel={choice.accel} {time.monotonic() - t0:.2f}s")

        # independent: libvirtd works in its own process, the KVM probe in a QEMU of its own
        try:
            await asyncio.gather(libvirt_caps(), kvm())
        except Exception:  # a probe's own bug: the first pod probes again, in its path
            log.exception("vm start-up probes failed")
        self._publish()
        log.info("vm start-up probes done in %.2fs (%s)", time.monotonic() - t0, ", ".join(found))

    async def probed(self) -> None:
        """Wait for the start-up probes if they still run (only the first pods do)."""
        task = self._probes
        if task is not None and not task.done():
            # shielded: a pod that gives up must not cancel them for the next one
            with contextlib.suppress(Exception):
                await asyncio.shield(task)

    async def close(self) -> None:
        if self._probes is not None and not self._probes.done():
            self._probes.cancel()
            await asyncio.wait([self._probes])
        if self._hv is not None:
            await self._hv.close()
            self._hv = None
