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

from tests.vm.vsock.vsockvm import GUEST_PORT, VM

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
def vm(guest_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    d = tmp_path_factory.mktemp("vsockvm")
    v = VM(guest_image, d, listen_ports=[GUEST_PORT])
    try:
        v.start()
        yield v
    finally:
        v.stop()
