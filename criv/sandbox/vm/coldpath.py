"""A vm pod's cold path up to the domain: everything that needs no pod network, run as
independent steps together (and, from RunPodSandbox, alongside CNI ADD), each step timed
(one ``cold path:`` log line per pod, which bench/podstart.py reads).

The steps: the vsock backend; the share, then virtiofsd serving it; the tap (created in
the host netns: only its MAC and MTU wait for CNI); the start-up probes if they still run
(KVM or TCG, libvirt's QEMU capabilities) and the libvirt connection. What a failure
leaves is undone by ``VmIsolation.destroy``, once every step has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any

from criv import failpoints
from criv.guestimage import GuestImage
from criv.hypervisor.hostsetup import QEMU_USER
from criv.hypervisor.kvm import AccelChoice
from criv.network.tap import create_tap
from criv.network.tap import tap_name as pod_tap_name
from criv.sandbox.isolation import PodPaths
from criv.sandbox.records import PodRecord
from criv.sandbox.steps import together
from criv.sandbox.vm import share as shares
from criv.sandbox.vm import virtiofs
from criv.sandbox.vm.backend import VsockBackends
from criv.sandbox.vm.host import VmHost
from criv.sandbox.vm.layout import vsock_cid


class StepClock:
    """Seconds per named step, in the order the steps started."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.steps[name] = time.monotonic() - t0

    async def timed(self, name: str, aw: Awaitable[Any]) -> Any:
        with self.step(name):
            return await aw

    def line(self) -> str:
        return ", ".join(f"{k} {v:.3f}s" for k, v in self.steps.items())


@dataclass
class Prepared:
    """What the steps made, for the domain."""

    image: GuestImage  # kernel, initramfs, root disk
    accel: AccelChoice
    cid: int
    backend_pid: int
    backend_start: int
    virtiofsd_pid: int
    tap: str  # "" without a pod netns
    clock: StepClock = field(default_factory=StepClock)


async def prepare(
    host: VmHost, backends: VsockBackends, owner: str, pod: PodRecord, paths: PodPaths
) -> Prepared:
    clock = StepClock()
    with clock.step("host"):
        await host.preflight()
        image = await asyncio.to_thread(host.guest_image)

    def dirs() -> None:
        for d in (paths.run, paths.state):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for s in paths.run.iterdir():
            if s.is_socket():
                s.unlink()

    await asyncio.to_thread(dirs)
    cid = vsock_cid(pod.id)
    (backend_pid, backend_start), fs_pid, tap, accel = await together(
        clock.timed("[backend]", start_backend(backends, pod.id, paths, cid)),
        clock.timed("[share+virtiofsd]", start_share(paths)),
        clock.timed("[tap]", make_tap(pod, owner)),
        clock.timed("[probes]", host_ready(host, image)),
    )
    return Prepared(image, accel, cid, backend_pid, backend_start, fs_pid, tap, clock)


async def start_backend(
    backends: VsockBackends, pod_id: str, paths: PodPaths, cid: int
) -> tuple[int, int]:
    started = await backends.start(pod_id, paths, cid)
    failpoints.hit("vm_boot.after_backend")
    return started


async def start_share(paths: PodPaths) -> int:
    await shares.prepare(paths)  # before virtiofsd: it serves the read-only view
    fs_pid, _ = await virtiofs.start(paths, QEMU_USER)
    failpoints.hit("vm_boot.after_virtiofsd")
    return fs_pid


async def make_tap(pod: PodRecord, owner: str) -> str:
    if not pod.netns:
        return ""
    tap = pod_tap_name(pod.id)
    await create_tap(tap, owner)  # in the host netns: needs nothing of CNI's
    failpoints.hit("vm_boot.after_tap")
    return tap


async def host_ready(host: VmHost, image: GuestImage) -> AccelChoice:
    await host.probed()  # the start-up probes, if they still run
    accel = await host.accel(image)
    await host.hypervisor()
    return accel
