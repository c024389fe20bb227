"""Guest root against the pod's share (docs/security.md). A privileged container with
``pid: NODE`` enters the guest init's mount namespace (``nsenter -t 1 -m``), where the
pod's 9p share is mounted, and tries to steer the host: swap the per-container skeleton
for a link to a host directory, plant links where the next mount goes, write, chmod
u+s and mknod into a read-only hostPath. The assertions are on the host."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest

from criv.hypervisor.hostsetup import QEMU_USER
from criv.hypervisor.libvirtbase import qemu_pid
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

pytestmark = pytest.mark.vm

SHARE = "/run/criv/shared"
# virtlogd.conf defaults (max_size, max_backups): what bounds a pod's console log
VIRTLOGD_MAX_SIZE = 2 * 1024 * 1024
VIRTLOGD_MAX_BACKUPS = 3

# Each attempt prints "<name>=ok" or "<name>=denied"; the guest is root in init's mount ns.
ATTACK = r"""
try() { n=$1; shift; if "$@" 2>/dev/null; then echo "$n=ok"; else echo "$n=denied"; fi; }
g() { nsenter -t 1 -m -- "$@"; }
me=$(g ls {share}/c | head -n1)
try rename_c        g mv {share}/c {share}/c.old
try link_c          g ln -s {target} {share}/c2
try plant_next      g ln -s {target} {share}/c/next
try plant_sibling   g ln -s {target} {share}/c/$me/m9
try mkdir_root      g mkdir {share}/x
try write_ro        g sh -c 'echo pwned > {share}/c/'$me'/m0/data'
try chmod_suid_ro   g chmod 4755 {share}/c/$me/m0/data
try mknod_ro        g mknod {share}/c/$me/m0/null c 1 3
try write_rw        g sh -c 'echo from-guest > {share}/c/'$me'/m1/note'
try mknod_rw        g mknod {share}/c/$me/m1/null c 1 3
echo done
"""


def _privileged_node_pid() -> api_pb2.LinuxContainerSecurityContext:
    return api_pb2.LinuxContainerSecurityContext(
        privileged=True, namespace_options=api_pb2.NamespaceOption(pid=api_pb2.NODE)
    )


@pytest.mark.timeout(600)
def test_guest_root_cannot_steer_the_share_or_write_read_only_volumes(
    vm_cri: Cri, tmp_path: Path
) -> None:
    ro, rw, target = tmp_path / "ro", tmp_path / "rw", tmp_path / "host-target"
    for d in (ro, rw, target):
        d.mkdir()
    (ro / "data").write_text("original\n")
    sb_sec = api_pb2.LinuxSandboxSecurityContext(privileged=True)
    pod = vm_cri.run_pod("hostile", linux=api_pb2.LinuxPodSandboxConfig(security_context=sb_sec))
    mounts = [
        api_pb2.Mount(container_path="/ro", host_path=str(ro), readonly=True),
        api_pb2.Mount(container_path="/rw", host_path=str(rw)),
    ]
    cid = vm_cri.run(pod, "attacker", ["sleep", "3600"], security=_privileged_node_pid(),
                     mounts=mounts)  # fmt: skip
    script = ATTACK.replace("{share}", SHARE).replace("{target}", str(target))
    r = vm_cri.exec(cid, ["sh", "-c", script], timeout=60)
    out = dict(line.split("=", 1) for line in r.stdout.decode().split() if "=" in line)
    assert "done" in r.stdout.decode(), (r.stdout, r.stderr)
    # the skeleton is read-only to the guest: nothing to swap, nowhere to plant a link
    for attempt in ("rename_c", "link_c", "plant_next", "plant_sibling", "mkdir_root"):
        assert out[attempt] == "denied", (attempt, out)
    # read-only means read-only in both layers; special files never reach the host
    for attempt in ("write_ro", "chmod_suid_ro", "mknod_ro"):
        assert out[attempt] == "denied", (attempt, out)
    assert out["write_rw"] == "ok", out
    # virtiofsd may not create device nodes, even in a writable volume
    assert out["mknod_rw"] == "denied", out
    assert not (rw / "null").exists()
    assert (ro / "data").read_text() == "original\n"
    assert (ro / "data").stat().st_mode & 0o7777 == 0o644
    assert sorted(p.name for p in ro.iterdir()) == ["data"]
    assert (rw / "note").read_text() == "from-guest\n"

    # the host goes on creating containers with volumes, and only where it means to
    vol2 = tmp_path / "vol2"
    vol2.mkdir()
    cid2 = vm_cri.run(pod, "second", ["sleep", "3600"],
                      mounts=[api_pb2.Mount(container_path="/v", host_path=str(vol2))])  # fmt: skip
    assert vm_cri.exec(cid2, ["sh", "-c", "echo hi > /v/x && cat /v/x"]).stdout == b"hi\n"
    assert list(target.iterdir()) == [], "the host wrote where the guest pointed"
    assert str(target) not in Path("/proc/self/mountinfo").read_text()

    vm_cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    vm_cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    # teardown never deletes a volume's content
    assert (ro / "data").read_text() == "original\n" and (rw / "note").exists()
    assert (vol2 / "x").read_text() == "hi\n"


@pytest.mark.timeout(600)
def test_a_console_flood_is_capped_on_the_host(vm_cri: Cri) -> None:
    """The serial console is logged through virtlogd, which rotates it: a guest writing
    without end takes a bounded amount of host disk, and criv keeps answering."""
    sb_sec = api_pb2.LinuxSandboxSecurityContext(privileged=True)
    pod = vm_cri.run_pod("flood", linux=api_pb2.LinuxPodSandboxConfig(security_context=sb_sec))
    info = json.loads(
        vm_cri.rt.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=30
        ).info["info"]
    )
    console = Path(info["isolationState"]["console_log"])
    cid = vm_cri.run(pod, "flooder", ["sleep", "3600"], security=_privileged_node_pid())
    flood = "head -c 6000000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo flooded"
    r = vm_cri.exec(cid, ["nsenter", "-t", "1", "-m", "--", "sh", "-c", flood], timeout=300)
    assert r.stdout == b"flooded\n", (r.stdout, r.stderr)
    logs = sorted(console.parent.glob(console.name + "*"))
    total = sum(p.stat().st_size for p in logs)
    assert len(logs) >= 2, "the console log was never rotated"
    assert console.stat().st_size <= VIRTLOGD_MAX_SIZE
    assert total <= VIRTLOGD_MAX_SIZE * (VIRTLOGD_MAX_BACKUPS + 1)
    assert vm_cri.exec(cid, ["echo", "alive"]).stdout == b"alive\n"
    vm_cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    vm_cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)


@pytest.mark.timeout(600)
def test_qemu_runs_unprivileged_and_confined(vm_cri: Cri) -> None:
    """QEMU is criv-qemu (not root), in a mount namespace of its own, under seccomp."""
    pod = vm_cri.run_pod("confined")
    info = json.loads(
        vm_cri.rt.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=30
        ).info["info"]
    )
    pid = qemu_pid(info["isolationState"]["domain"])
    assert pid > 0
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    uids = {int(u) for u in status["Uid"].split()}
    assert uids == {pwd.getpwnam(QEMU_USER).pw_uid}, status["Uid"]
    assert int(status["Seccomp"]) == 2  # filter mode
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    vm_cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    vm_cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
