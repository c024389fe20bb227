"""Transient domains through the real libvirtd (TCG): boot, console log, virtio-fs, stop, no
leftovers."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from criv.errors import InvalidArgument
from criv.guestimage import GuestImage
from criv.hypervisor.domain import Machine
from criv.hypervisor.driver import Hypervisor
from criv.hypervisor.hostsetup import QEMU_USER, start_libvirtd
from criv.hypervisor.sizing import VmSize
from criv.hypervisor.spec import PodVm, pod_domain
from criv.sandbox.isolation import PodPaths
from criv.sandbox.vm import virtiofs
from tests.support.vm import qemu_traversable

pytestmark = pytest.mark.vm


@pytest.fixture
async def hv() -> AsyncIterator[Hypervisor]:
    await asyncio.to_thread(start_libvirtd)
    h = Hypervisor()
    await h.connect()
    yield h
    for d in await h.list_domains():
        if d.sandbox_id.startswith("test-"):
            await h.destroy(d.name)
    await h.close()


def _vm(
    image: GuestImage, tmp: Path, mode: str, machine: Machine = "q35", share: bool = True
) -> PodVm:
    """A VM with (``share``) a virtio-fs share of ``tmp/shared`` served by a virtiofsd of
    its own."""
    paths = PodPaths(tmp, tmp / "run")
    paths.shared.mkdir(exist_ok=True)
    paths.run.mkdir(exist_ok=True)
    qemu_traversable(paths.run)  # QEMU (criv-qemu) connects to the virtiofsd socket
    if share:
        virtiofs.spawn(paths, QEMU_USER)
    return PodVm(
        sandbox_id="test-" + uuid.uuid4().hex[:12],
        kernel=image.kernel,
        initrd=image.initrd,
        root_disk=image.root_disk,
        root_disk_bytes=image.root_disk_bytes(),
        size=VmSize(1, 256),
        accel="tcg",
        console_log=tmp / "console.log",
        fs_socket=virtiofs.fs_socket(paths) if share else None,
        extra_cmdline=(f"criv.test={mode}",),
        machine=machine,
    )


async def _wait_for(path: Path, text: str, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and text in path.read_text(errors="replace"):
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s:\n" + _tail(path))


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no console log)"


def _qemu_for(name: str) -> list[str]:
    r = subprocess.run(["pgrep", "-f", f"guest={name}"], capture_output=True, text=True)
    return r.stdout.split()


@pytest.mark.timeout(2400)
async def test_boot_console_share_and_self_poweroff(
    hv: Hypervisor, guest_image: GuestImage, tmp_path: Path
) -> None:
    vm = _vm(guest_image, tmp_path, "python")
    dom = pod_domain(vm)
    stops: list[tuple[str, str]] = []
    hv.add_stop_listener(lambda name, reason: stops.append((name, reason)))
    t0 = time.monotonic()
    info = await hv.create(dom)
    created = time.monotonic() - t0
    assert info.alive and info.sandbox_id == vm.sandbox_id
    assert [d.name for d in await hv.list_domains() if d.name == dom.name] == [dom.name]
    assert (await hv.lookup(uuid=dom.uuid)) is not None
    marker = await _wait_for(vm.console_log, "CRIV-GUEST-MARKER", 90)
    await _wait_for(vm.console_log, "CRIV-GUEST-DONE", 60)
    print(f"createXML {created:.2f} s; console marker {created + marker:.2f} s after create")
    log = vm.console_log.read_text(errors="replace")
    assert "CRIV-GUEST-PYTHON grpc 1.85.3" in log
    assert "CRIV-GUEST-SHARE ok" in log, _tail(vm.console_log)
    assert (tmp_path / "shared/criv-test-marker").read_text() == "written by the guest\n"
    # the init ends the VM (an emergency restart: docs/vm.md, Stopping); on_reboot=destroy
    # removes the transient domain
    assert await hv.wait_stopped(dom.name, timeout=60)
    assert await hv.state(dom.name) == "gone"
    await asyncio.sleep(0.2)
    assert (dom.name, "reset") in stops
    assert not _qemu_for(dom.name)


@pytest.mark.timeout(2400)
async def test_destroy_and_shutdown_deadline(
    hv: Hypervisor, guest_image: GuestImage, tmp_path: Path
) -> None:
    vm = _vm(guest_image, tmp_path, "hold")
    dom = pod_domain(vm)
    await hv.create(dom)
    await _wait_for(vm.console_log, "CRIV-GUEST-DONE", 90)
    assert _qemu_for(dom.name)
    # the guest ignores the ACPI button (no acpid): the deadline passes, then destroy
    assert await hv.shutdown(dom.name, timeout=1.0) == "destroyed"
    assert await hv.lookup(dom.name) is None
    assert not _qemu_for(dom.name)
    # idempotent
    assert await hv.destroy(dom.name) is False
    assert await hv.shutdown(dom.name, timeout=1.0) == "gone"

    second = tmp_path / "second"
    second.mkdir()
    vm2 = _vm(guest_image, second, "hold")
    dom2 = pod_domain(vm2)
    await hv.create(dom2)
    await _wait_for(vm2.console_log, "CRIV-GUEST-MARKER", 90)
    assert await hv.destroy(dom2.name) is True
    assert await hv.wait_stopped(dom2.name, timeout=10)
    assert not _qemu_for(dom2.name)


@pytest.mark.timeout(2400)
async def test_qemu_killed_from_outside_is_noticed(
    hv: Hypervisor, guest_image: GuestImage, tmp_path: Path
) -> None:
    vm = _vm(guest_image, tmp_path, "hold")
    dom = pod_domain(vm)
    stops: list[tuple[str, str]] = []
    hv.add_stop_listener(lambda name, reason: stops.append((name, reason)))
    await hv.create(dom)
    await _wait_for(vm.console_log, "CRIV-GUEST-MARKER", 90)
    (pid,) = _qemu_for(dom.name)
    subprocess.run(["kill", "-9", pid], check=True)  # this test's own VM
    assert await hv.wait_stopped(dom.name, timeout=20)
    for _ in range(100):
        if stops:
            break
        await asyncio.sleep(0.05)
    # libvirt reports a QEMU that died under it as STOPPED/FAILED
    assert stops == [(dom.name, "failed")], stops
    assert await hv.lookup(dom.name) is None


@pytest.mark.timeout(2400)
async def test_microvm_boots_and_stops(
    hv: Hypervisor, guest_image: GuestImage, tmp_path: Path
) -> None:
    vm = _vm(guest_image, tmp_path, "python", machine="microvm", share=False)
    with pytest.raises(InvalidArgument, match="virtio-fs"):
        # no share on microvm (see criv/hypervisor/spec.py)
        pod_domain(dataclasses.replace(vm, fs_socket=tmp_path / "fs.sock"))
    dom = pod_domain(vm)
    await hv.create(dom)
    await _wait_for(vm.console_log, "CRIV-GUEST-DONE", 90)
    log = vm.console_log.read_text(errors="replace")
    assert "CRIV-GUEST-PYTHON grpc 1.85.3" in log, log[-3000:]
    # no ACPI on microvm: the init restarts instead, and on_reboot=destroy ends the domain
    assert await hv.wait_stopped(dom.name, timeout=60)
    assert not _qemu_for(dom.name)
