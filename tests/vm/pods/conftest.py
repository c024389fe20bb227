"""The vm pod suite: a real criv whose pods are libvirt/QEMU VMs (TCG here), driven through
CRI with the runtime suite's ``Cri`` helper (tests/support/cri.py).

``vm_cri`` is criv with vm isolation (kernel + initramfs from the session's guest image, so
the image matches the agent source under test; ``vm.accel: tcg`` skips the KVM probe, which
costs seconds per criv on a host whose /dev/kvm cannot run guests, except in the test that
checks the probe). Teardown, beyond the suite-wide leak check: no criv domain left in
libvirt.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from criv.guestimage import GuestImage
from criv.hypervisor.hostsetup import start_libvirtd
from tests.support.cri import (  # noqa: F401  (fixtures)
    Cri,
    cni_overrides,
    config_for,
    cri_factory,
    no_cgroup_leaks,
    registry,
)
from tests.support.daemon import merge


def criv_domains() -> set[str]:
    r = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
    )
    return {n for n in r.stdout.split() if n.startswith("criv-")}


@pytest.fixture(scope="session")
def libvirtd() -> None:
    start_libvirtd()


@pytest.fixture
def vm_config(guest_image: GuestImage, libvirtd: None) -> dict[str, Any]:
    return {
        "vm": {
            "kernel": str(guest_image.kernel),
            "initrd": str(guest_image.initrd),
            "accel": "tcg",
        },
        "runtime": {"handlers": {"": "vm", "vm": "vm", "host": "host"}},
    }


@pytest.fixture
def vm_cri_factory(
    cri_factory: Callable[..., Cri],  # noqa: F811  (the imported fixture)
    vm_config: dict[str, Any],
) -> Iterator[Callable[..., Cri]]:
    before = criv_domains()
    made: list[Cri] = []

    def make(pull: bool = True, **extra: Any) -> Cri:
        c = cri_factory(pull=pull, **merge(vm_config, extra))
        c.default_handler = "vm"
        made.append(c)
        return c

    yield make
    for c in made:  # as kubelet would (cri_factory does it too, but after this check)
        c.teardown()
    left = criv_domains() - before
    assert not left, f"domains left behind: {sorted(left)}"


@pytest.fixture
def vm_cri(vm_cri_factory: Callable[..., Cri]) -> Cri:
    return vm_cri_factory()


@pytest.fixture(params=["host", "vm"])
def any_cri(
    request: pytest.FixtureRequest,
    cri_factory: Callable[..., Cri],  # noqa: F811  (the imported fixture)
) -> Cri:
    """The same test in both isolation modes (the vm half needs the vm fixtures)."""
    if request.param == "host":
        return cri_factory()
    factory: Callable[..., Cri] = request.getfixturevalue("vm_cri_factory")
    return factory()
