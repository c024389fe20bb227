"""kill -9 of each process a vm pod stands on, one at a time (issue 13): QEMU, the pod's
vsock backend, the guest agent and libvirtd. A pod whose VM (or its only way in) is gone
turns NOTREADY, its containers EXITED, and criv's log says what died; libvirtd is not
needed by a running pod: the pod keeps working, and once libvirtd is back criv
reconnects and stops and removes the pod. Bounds are generous (TCG on 2 busy cores):
the point is that it happens by itself, not how fast."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from criv.hypervisor.hostsetup import libvirtd_running, start_libvirtd
from criv_agent.api.runtime.v1 import api_pb2
from tests.support import faults
from tests.support.cri import Cri

pytestmark = [pytest.mark.vm, pytest.mark.timeout(400)]

NOTREADY_BOUND = 60.0


def _pod(cri: Cri, **kw: object) -> tuple[str, str, dict[str, object]]:
    """A READY vm pod with a running container; its isolation state."""
    pod = cri.run_pod(faults.POD)
    cid = cri.run(pod, faults.APP, faults.SLEEP, **kw)
    assert cri.exec(cid, ["echo", "ok"]).stdout == b"ok\n"
    return pod, cid, cri.isolation_state(pod)


def _pids_with(*words: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if all(w in cmd for w in words):
                out.append(int(d.name))
    return out


def _notready(cri: Cri, pod: str, cid: str) -> api_pb2.ContainerStatus:
    deadline = time.monotonic() + NOTREADY_BOUND
    while cri.pod_status(pod).state != api_pb2.SANDBOX_NOTREADY:
        assert time.monotonic() < deadline, f"pod still READY:\n{cri.proc.logs()}"
        time.sleep(0.1)
    st = cri.status(cid)
    assert st.state == api_pb2.CONTAINER_EXITED, st
    return st


def test_qemu_killed(vm_cri: Cri) -> None:
    ipam = faults.ipam_addresses(vm_cri)
    pod, cid, iso = _pod(vm_cri)
    domain = str(iso["domain"])
    pid = int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text())
    assert f"guest={domain}" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    os.kill(pid, signal.SIGKILL)
    assert _notready(vm_cri, pod, cid).reason == "VMExited"
    assert "its VM stopped unexpectedly" in vm_cri.proc.logs()
    faults.check_gone(vm_cri, ipam)


def test_vsock_backend_killed(vm_cri: Cri) -> None:
    ipam = faults.ipam_addresses(vm_cri)
    pod, cid, _ = _pod(vm_cri)
    pids = _pids_with("criv.vsock", f"/p/{pod[:12]}/")
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    _notready(vm_cri, pod, cid)
    assert "vsock backend is gone" in vm_cri.proc.logs()
    faults.check_gone(vm_cri, ipam)  # the VM itself may still run: Stop destroys it


def test_guest_agent_killed(vm_cri: Cri) -> None:
    ipam = faults.ipam_addresses(vm_cri)
    # the guest's pid namespace: the agent is visible (and killable) from this container
    sec = api_pb2.LinuxContainerSecurityContext(
        namespace_options=api_pb2.NamespaceOption(pid=api_pb2.NODE)
    )
    pod, cid, _ = _pod(vm_cri, security=sec)
    # the pattern is split so that this shell's own command line does not match it
    find = (
        'a=criv-; for p in /proc/[0-9]*; do case "$(tr "\\0" " " < $p/cmdline)" in '
        "*${a}agent*--control*) echo ${p#/proc/};; esac; done 2>/dev/null"
    )
    agents = vm_cri.exec(cid, ["sh", "-c", find]).stdout.split()
    assert agents, "no agent process seen in the guest"
    with contextlib.suppress(grpc.RpcError):  # the agent that would answer is gone
        vm_cri.exec(cid, ["kill", "-9", *[a.decode() for a in agents]], timeout=5)
    assert _notready(vm_cri, pod, cid).reason == "VMExited"
    assert "its VM stopped unexpectedly" in vm_cri.proc.logs()
    console = Path(vm_cri.isolation_state(pod)["console_log"])
    assert "criv-agent exited" in console.read_text(errors="replace")
    faults.check_gone(vm_cri, ipam)


def test_libvirtd_killed(vm_cri: Cri) -> None:
    ipam = faults.ipam_addresses(vm_cri)
    pod, cid, _ = _pod(vm_cri)
    pids = [int(p) for p in subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True,
            text=True).stdout.split()]  # fmt: skip
    assert pids
    try:
        for p in pids:
            os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while libvirtd_running():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # a running pod needs no libvirtd: it stays READY and takes commands
        time.sleep(2)  # time for criv to notice (it must not take the pod down)
        assert vm_cri.pod_status(pod).state == api_pb2.SANDBOX_READY
        assert vm_cri.exec(cid, ["echo", "ok"]).stdout == b"ok\n"
    finally:
        start_libvirtd()
    assert vm_cri.pod_status(pod).state == api_pb2.SANDBOX_READY
    assert vm_cri.exec(cid, ["echo", "ok"]).stdout == b"ok\n"
    faults.check_gone(vm_cri, ipam)  # through a new libvirt connection
    assert "libvirt connection closed" in vm_cri.proc.logs()
