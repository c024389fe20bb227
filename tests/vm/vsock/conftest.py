"""Fixtures for the vsock backend VM tests: a TCG QEMU guest (Debian 6.1 kernel, busybox
initramfs, tests/vm/vsock/guest/vsock-guest.c on vsock port 1000) behind criv's
vhost-user-vsock backend process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.leaks import Snapshot, check_no_leaks
from tests.vm.vsock.vsockvm import VM, SharedVM

ROOT = Path(__file__).resolve().parents[3]
BUILD = ROOT / "images" / "test-vsock" / "build.py"


@pytest.fixture(scope="session")
def guest_image() -> Path:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    r = subprocess.run(
        [sys.executable, str(BUILD)], capture_output=True, text=True, timeout=600, check=False
    )
    if r.returncode != 0:
        pytest.fail(f"building the test initramfs failed:\n{r.stderr[-3000:]}")
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def make_vm(guest_image: Path, tmp_path: Path) -> Iterator[Callable[..., VM]]:
    vms: list[VM] = []

    def factory(*, listen_ports: list[int] | None = None, cid: int = 3, serial: bool = False) -> VM:
        d = tmp_path / f"vm{len(vms)}"
        d.mkdir()
        vm = VM(guest_image, d, listen_ports=listen_ports, cid=cid, serial=serial)
        vms.append(vm)
        return vm.start()

    yield factory
    for vm in vms:
        vm.stop()


@pytest.fixture(scope="module")
def shared_vm(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedVM]:
    shared = SharedVM(guest_image, tmp_path_factory.mktemp("vsockvm"))
    try:
        yield shared
    finally:
        shared.stop()


@pytest.fixture
def vm(shared_vm: SharedVM) -> VM:
    """The module's VM, known to answer (replaced first if a test before broke it)."""
    return shared_vm.healthy()


@pytest.fixture(autouse=True)
def no_leaks(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """The root conftest's leak check, with its snapshot taken once the shared VM is known
    healthy: a VM replaced for a test belongs to the module, not to that test."""
    if "vm" in request.fixturenames:
        request.getfixturevalue("vm")
    scope = str(tmp_path_factory.getbasetemp())
    before = Snapshot.take(scope)
    yield
    leaks = check_no_leaks(before, scope)
    assert not leaks, "leaked after test:\n  " + "\n  ".join(leaks)
