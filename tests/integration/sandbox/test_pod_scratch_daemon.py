"""The per-pod writable-layer limit through a real criv, in both isolation modes: a
container that writes past ``runtime.pod_scratch_limit_mib`` gets ENOSPC ("No space
left on device"), the host pays at most the limit, and RemovePodSandbox leaves no mount
or loop device. The vm half boots a VM (TCG) and carries the ``vm`` marker."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from criv.mounts import is_mounted, mounts_under
from criv_agent.api.runtime.v1 import api_pb2
from tests.integration.sandbox.test_pod_scratch import _no_loops_under
from tests.support.cri import (  # noqa: F401  (fixtures)
    Cri,
    cni_overrides,
    cri_factory,
    no_cgroup_leaks,
    registry,
)
from tests.support.vm import (  # noqa: F401  (fixtures)
    guest_image,
    libvirtd,
    template_dir,
    vm_config,
    vm_cri_factory,
)

pytestmark = pytest.mark.integration

LIMIT_MIB = 64
# conv=fsync: a vm guest's page cache must not hide the error until later
FILL = "dd if=/dev/zero of=/fill bs=1M count=200 conv=fsync"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["host", pytest.param("vm", marks=pytest.mark.vm)])
def test_a_container_writing_past_its_pods_limit_gets_enospc(
    request: pytest.FixtureRequest,
    mode: str,
    cri_factory: Callable[..., Cri],  # noqa: F811
    cni_overrides: object,  # noqa: F811  (session-wide: set up before the leak snapshot)
) -> None:
    factory = cri_factory if mode == "host" else request.getfixturevalue("vm_cri_factory")
    cri = factory(runtime={"pod_scratch_limit_mib": LIMIT_MIB})
    pod = cri.run_pod("scratch", handler=mode)
    pod_dir = cri.proc.state_dir / "sandboxes" / pod
    assert not (pod_dir / "scratch.img").exists(), "made at the first container, not before"
    cid = cri.run(pod, "fill", ["sleep", "1000"])
    assert is_mounted(pod_dir / "scratch")

    r = cri.exec(cid, ["sh", "-c", FILL], timeout=240)
    assert r.exit_code != 0 and b"No space left on device" in r.stderr, r.stderr
    img = (pod_dir / "scratch.img").stat()
    assert img.st_blocks * 512 <= (LIMIT_MIB + 1) << 20, "the host paid beyond the limit"
    assert not (pod_dir / "containers" / cid / "upper").exists()
    upper_fill = pod_dir / "scratch" / cid / "upper" / "fill"
    assert 0 < upper_fill.stat().st_size <= LIMIT_MIB << 20
    # freeing space in the container gives it back
    r = cri.exec(cid, ["sh", "-c", "rm /fill && echo ok > /after && cat /after"], timeout=60)
    assert r.exit_code == 0 and r.stdout == b"ok\n", r.stderr

    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    assert not pod_dir.exists()
    assert not mounts_under(cri.proc.state_dir / "sandboxes")
    assert _no_loops_under(cri.proc.state_dir) == [], "loop device left"
