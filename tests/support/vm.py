"""A real criv whose pods are libvirt/QEMU VMs (TCG here), driven through CRI with the
runtime suite's ``Cri`` helper (tests/support/cri.py). Import the fixtures into a conftest
(the vm pod suite, tests/vm/pods; the e2e suite, tests/e2e) together with cri.py's.

``vm_cri`` is criv with vm isolation (kernel + initramfs from the session's guest image, so
the image matches the agent source under test; ``vm.accel: tcg`` skips the KVM probe, which
costs seconds per criv on a host whose /dev/kvm cannot run guests, except in the test that
checks the probe). Teardown, beyond the suite-wide leak check: no criv domain left in
libvirt.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from criv.guestimage import DEFAULT_CACHE_ROOT, GuestImage, build_guest_image
from criv.hypervisor.hostsetup import start_libvirtd
from criv.hypervisor.spec import TEMPLATE_DOMAIN_PREFIX
from criv.sandbox.vm.spares import SPARE_DOMAIN_PREFIX
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.daemon import merge

# a pod whose container may be guest root: privileged, in the guest's own pid namespace
# (``nsenter -t 1`` then reaches the guest's mount and network namespaces)
PRIVILEGED_POD = api_pb2.LinuxPodSandboxConfig(
    security_context=api_pb2.LinuxSandboxSecurityContext(privileged=True)
)
GUEST_ROOT = api_pb2.LinuxContainerSecurityContext(
    privileged=True, namespace_options=api_pb2.NamespaceOption(pid=api_pb2.NODE)
)


def wait_template(tdir: Path, timeout: float = 300) -> Path:
    """The first ready template under ``tdir`` (criv builds it after a cold boot)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [m.parent for m in tdir.glob("[!.]*/meta.json")]
        if ready:
            return ready[0]
        time.sleep(0.5)
    raise AssertionError(f"no template in {tdir} after {timeout}s")


def criv_domains(templates: bool = False) -> set[str]:
    """criv's domains in libvirt; template builds and spare VMs only with ``templates``
    (they may still be there when a test ends: they go when their criv stops; see
    ``template_dir``)."""
    r = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
    )
    names = {n for n in r.stdout.split() if n.startswith("criv-")}
    if templates:
        return names
    return {n for n in names if not n.startswith((TEMPLATE_DOMAIN_PREFIX, SPARE_DOMAIN_PREFIX))}


@pytest.fixture(scope="session")
def template_dir(guest_image: GuestImage) -> Iterator[Path]:
    """One template directory for every criv of the session, kept beside the guest image
    cache (templates are keyed by content: a later run reuses the ones still valid). At the
    end no template build may be left running."""
    yield Path(os.environ.get("CRIV_TEMPLATE_DIR", str(DEFAULT_CACHE_ROOT.parent / "templates")))
    left = criv_domains(templates=True)
    assert not left, f"domains left at the end of the session: {sorted(left)}"


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """Built once per machine (cached by content hash), then reused (as tests/vm/conftest.py)."""
    cache = Path(os.environ.get("CRIV_GUEST_IMAGE_CACHE", str(DEFAULT_CACHE_ROOT)))
    return build_guest_image(cache, lambda line: print(f"[guest-image] {line}", flush=True))


@pytest.fixture(scope="session")
def libvirtd() -> None:
    start_libvirtd()


@pytest.fixture
def vm_config(guest_image: GuestImage, libvirtd: None, template_dir: Path) -> dict[str, Any]:
    return {
        "vm": {
            "kernel": str(guest_image.kernel),
            "initrd": str(guest_image.initrd),
            "root_disk": str(guest_image.root_disk or ""),
            "accel": "tcg",
            "template_dir": str(template_dir),
        },
        "runtime": {"handlers": {"": "vm", "vm": "vm", "host": "host"}},
    }


def qemu_traversable(path: Path) -> None:
    """QEMU runs unprivileged (docs/security.md) and must reach a pod's vhost-user sockets
    under criv's run dir, as it reaches /run/criv on a node; pytest makes its temp dirs
    0700. Let others traverse (not list) the test's dirs up to /tmp."""
    for d in (path, *path.parents):
        if d in (Path("/tmp"), Path("/")):
            break
        d.chmod(d.stat().st_mode & 0o7777 | 0o711)


@pytest.fixture
def vm_cri_factory(
    cri_factory: Callable[..., Cri],
    vm_config: dict[str, Any],
    tmp_path: Path,
) -> Iterator[Callable[..., Cri]]:
    qemu_traversable(tmp_path)
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
def any_cri(request: pytest.FixtureRequest, cri_factory: Callable[..., Cri]) -> Cri:
    """The same test in both isolation modes (the vm half needs the vm fixtures)."""
    if request.param == "host":
        return cri_factory()
    factory: Callable[..., Cri] = request.getfixturevalue("vm_cri_factory")
    return factory()
