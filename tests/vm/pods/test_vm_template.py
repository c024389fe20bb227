"""VM templates (docs/vm.md): the first pod of a shape boots cold and has its template
built; later pods start as clones of it, each with its own identity (RNG, clock,
machine-id, MAC, hostname, IP); a template a clone cannot load is dropped and the pod
boots cold; ``vm.template: off`` never clones.

Each test has its own template directory (the session's shared one would hide the cold
start and the build)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.vm import GUEST_ROOT, PRIVILEGED_POD, wait_template

pytestmark = pytest.mark.vm

FACTS = (
    "nsenter -t 1 -m -n -- sh -c 'cat /etc/machine-id; "
    'cat /sys/class/net/eth0/address; head -c 16 /dev/urandom | od -An -tx1 | tr -d " \\n"; '
    "echo; date +%s; hostname'"
)


def _guest_facts(cri: Cri, name: str) -> tuple[list[str], str, str]:
    pod = cri.run_pod(name, linux=PRIVILEGED_POD)
    cid = cri.run(pod, "probe", ["sleep", "3600"], security=GUEST_ROOT)
    r = cri.exec(cid, ["sh", "-c", FACTS], timeout=30)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.stdout.decode().split("\n"), pod, cid


@pytest.mark.timeout(900)
def test_clones_start_fast_with_their_own_identity(
    vm_cri_factory: Callable[..., Cri], tmp_path: Path
) -> None:
    tdir = tmp_path / "templates"
    cri = vm_cri_factory(vm={"template_dir": str(tdir)})
    first = cri.run_pod("cold")
    assert cri.isolation_state(first)["template"] == ""  # no template yet: booted cold
    key = wait_template(tdir).name
    assert (tdir / key / "state.bin").stat().st_mode & 0o777 == 0o600

    facts = []
    for name in ("clone-a", "clone-b"):
        lines, pod, cid = _guest_facts(cri, name)
        assert cri.isolation_state(pod)["template"] == key
        st = cri.pod_status(pod)
        facts.append((lines, st.network.ip, pod))
        # the pod works as a cold one does: its share (rootfs), its network, its logs
        assert cri.exec(cid, ["cat", "/etc/hostname"]).stdout.decode().strip() == name
    (a, ip_a, pod_a), (b, ip_b, _) = facts
    machine_a, mac_a, rng_a, clock_a, host_a = a[:5]
    machine_b, mac_b, rng_b, clock_b, host_b = b[:5]
    assert len(machine_a) == 32 and machine_a != machine_b
    assert mac_a != mac_b and mac_a == cri.isolation_state(pod_a)["mac"]
    assert rng_a != rng_b and len(rng_a) == 32
    assert abs(int(clock_a) - time.time()) < 30 and abs(int(clock_b) - time.time()) < 30
    assert (host_a, host_b) == ("clone-a", "clone-b")
    assert ip_a and ip_b and ip_a != ip_b


@pytest.mark.timeout(900)
def test_a_template_that_does_not_load_is_dropped_and_the_pod_boots_cold(
    vm_cri_factory: Callable[..., Cri], tmp_path: Path
) -> None:
    tdir = tmp_path / "templates"
    cri = vm_cri_factory(vm={"template_dir": str(tdir)})
    cri.run_pod("first")
    t = wait_template(tdir)
    t.joinpath("state.bin").write_bytes(b"not a migration stream")
    pod = cri.run_pod("after-damage")
    assert cri.isolation_state(pod)["template"] == ""
    cid = cri.run(pod, "c", ["sh", "-c", "echo up; sleep 3600"])
    assert cri.exec(cid, ["echo", "ok"]).stdout == b"ok\n"
    # dropped, and built again for the next pod
    rebuilt = wait_template(tdir)
    assert rebuilt.name == t.name and rebuilt.joinpath("state.bin").stat().st_size > 1024
    # the guest RAM: a sparse file of what the template used, tens of MiB of data
    assert rebuilt.joinpath("ram.bin").stat().st_blocks * 512 > 16 << 20
    # a pod of another shape has its own template
    big = cri.run_pod(
        "bigger",
        linux=api_pb2.LinuxPodSandboxConfig(
            resources=api_pb2.LinuxContainerResources(memory_limit_in_bytes=384 << 20)
        ),
    )
    assert cri.isolation_state(big)["template"] == ""


@pytest.mark.timeout(600)
def test_template_off_boots_every_pod_cold(
    vm_cri_factory: Callable[..., Cri], tmp_path: Path
) -> None:
    tdir = tmp_path / "templates"
    cri = vm_cri_factory(vm={"template": "off", "template_dir": str(tdir)})
    for name in ("one", "two"):
        pod = cri.run_pod(name)
        assert cri.isolation_state(pod)["template"] == ""
    time.sleep(2)
    assert not tdir.exists() or not any(tdir.iterdir())
