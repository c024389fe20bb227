"""VM templates (docs/vm.md): the first pod of a shape boots cold and has its template
built; later pods start as clones of it, each with its own identity (RNG, clock,
machine-id, MAC, hostname, IP); a template a clone cannot load is dropped and the pod
boots cold; ``vm.template: off`` never clones; a spare VM (a clone loaded ahead) is taken
by the next pod.

Each test has its own template directory (the session's shared one would hide the cold
start and the build)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from criv.sandbox.vm.spares import is_spare_name
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
    # a clone ends itself when its pod stops, as a cold VM does: criv need not destroy it at
    # its deadline (a virtio-pmem flush that a clone never gets answered once hung there)
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_a), timeout=120)
    assert "VM still up after the agent left" not in cri.proc.logs()
    console = Path(str(cri.isolation_state(pod_a)["console_log"]))
    assert "sysrq: Resetting" in console.read_text(errors="replace")


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


def _spares() -> dict[str, str]:
    """criv's spare VMs in libvirt: name -> state."""
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all"], capture_output=True, text=True
    ).stdout
    rows = (line.split(None, 2) for line in out.splitlines()[2:] if line.strip())
    return {r[1]: r[2].strip() for r in rows if len(r) == 3 and is_spare_name(r[1])}


def _wait_spare(not_in: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = {n for n, st in _spares().items() if st == "running"} - not_in
        if ready:
            return ready.pop()
        time.sleep(0.5)
    raise AssertionError(f"no spare VM after {timeout}s: {_spares()}")


@pytest.mark.timeout(900)
def test_a_spare_vm_is_taken_by_the_next_pod_and_goes_with_it(
    vm_cri_factory: Callable[..., Cri], tmp_path: Path
) -> None:
    """vm.spare_vms (1 by default): once a pod starts as a clone, criv loads the next one
    ahead and keeps it running idle; the next pod takes it, with an identity of its own; the
    spare's domain goes with that pod's stop and its directory (the pod's console log) with
    its removal, another spare replaces it, and the last one goes when criv stops."""
    tdir = tmp_path / "templates"
    before = set(_spares())  # other crivs' (none in a serial run)
    cri = vm_cri_factory(vm={"template_dir": str(tdir)})
    cri.run_pod("cold")
    key = wait_template(tdir).name
    # the first spare is made once the template is: this pod may or may not find it
    clone_facts, clone, _ = _guest_facts(cri, "clone")
    pods_vms = {cri.isolation_state(clone)["domain"]}
    spare = _wait_spare(before | pods_vms)
    spare_root = Path(cri.proc.config["run_dir"]) / "spares"
    assert (spare_root / spare).is_dir()

    facts, pod, cid = _guest_facts(cri, "from-spare")
    iso = cri.isolation_state(pod)
    assert iso["domain"] == spare and iso["template"] == key
    assert Path(iso["console_log"]) == spare_root / spare / "console.log"
    assert _spares().get(spare) == "running"
    # the pod's own identity, not the template's or the other clone's
    assert facts[0] != clone_facts[0] and facts[2] != clone_facts[2]  # machine-id, RNG
    assert facts[1] == iso["mac"] and facts[4] == "from-spare"
    assert cri.exec(cid, ["cat", "/etc/hostname"]).stdout.decode().strip() == "from-spare"
    assert cri.pod_status(pod).network.ip

    nxt = _wait_spare(before | pods_vms | {spare})  # its successor
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    # stopped, the pod keeps its console log (in the spare's directory) as any pod does
    assert spare not in _spares()
    assert "sysrq: Resetting" in Path(iso["console_log"]).read_text(errors="replace")
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    assert not (spare_root / spare).exists()
    assert nxt in _spares()
    cri.teardown()
    assert cri.proc.stop() == 0
    assert not set(_spares()) - before, "criv left a spare VM when it stopped"
    assert not spare_root.exists() or not any(spare_root.iterdir())
