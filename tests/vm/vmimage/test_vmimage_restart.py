"""A vm-image pod across criv restarts, through the real daemon and CRI (the VM test disk
as a containerDisk): its VM runs on while criv is down and the next criv takes it back.

- A clean stop and a kill -9: each time the pod is READY, its container RUNNING, ExecSync
  answers over SSH with the same host key pin and pod key, the console (a ticker the
  guest writes to it all along) goes on in the container log with every line exactly
  once; then StopContainer powers it off cleanly (0, Completed) and the pod goes.
- A VM destroyed while criv is down: its container is EXITED 255 ``VMGone``, the pod
  still READY and able to run its next container; a pod whose agent record was corrupted
  while criv was down: NOTREADY, its container EXITED ``AgentGone``, its VM destroyed,
  and criv serves on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from criv.hypervisor.spec import domain_name
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.fixtures import TestRegistry
from tests.support.vm import criv_domains
from tests.support.vmimage import HANDLERS, create, pull, push_containerdisk, start_disk_pod

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

TICKER = (
    "env -u CRIV_EXEC_ID setsid sh -c 'i=0; while :; do echo tick-$i >/dev/console; "
    "i=$((i+1)); sleep 0.25; done' </dev/null >/dev/null 2>&1 &"
)


def restart(cri: Cri, kill: bool = False) -> float:
    """Stop criv (SIGTERM, or SIGKILL), start it again; seconds it was down."""
    t0 = time.monotonic()
    proc = cri.proc.proc
    assert proc is not None
    if kill:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    rc = cri.proc.stop()
    assert rc == (-9 if kill else 0), cri.proc.logs()
    if cri._exec_channel is not None:
        cri._exec_channel.close()
        cri._exec_channel = None
    if kill:
        cri.proc.socket.unlink(missing_ok=True)  # left by the killed criv
    cri.proc.start()
    return time.monotonic() - t0


def agent_record(cri: Cri, pod: str) -> Any:
    path = cri.proc.state_dir / "sandboxes" / pod / "vmimage" / "agent.json"
    return json.loads(path.read_text())["data"]


def ticks(cri: Cri, pod: str) -> list[int]:
    """The ticker's numbers in the container log (the first may follow the prompt of the
    console's shell, and its terminal query, on the same line)."""
    found = re.findall(r" stdout F .*?tick-(\d+)$", cri.log(pod, "vm"), re.MULTILINE)
    return [int(n) for n in found]


def wait_ticks_past(cri: Cri, pod: str, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (t := ticks(cri, pod)) or t[-1] < n:
        assert time.monotonic() < deadline, f"ticks stuck at {t[-3:]}:\n{cri.proc.logs()}"
        time.sleep(0.25)


def test_vmimage_pod_survives_criv_restarts(
    vm_cri_factory: Callable[..., Cri], registry: TestRegistry, test_disk: Path, tmp_path: Path
) -> None:
    cri = vm_cri_factory(runtime={"handlers": HANDLERS})
    pod, cid = start_disk_pod(cri, registry, test_disk, tmp_path, "vmr")
    r = cri.exec(cid, ["hostname"], timeout=180)
    assert (r.exit_code, r.stdout) == (0, b"vmr\n"), (r, cri.proc.logs())
    started = cri.status(cid).started_at
    r = cri.exec(cid, ["sh", "-c", TICKER])
    assert r.exit_code == 0, r
    wait_ticks_past(cri, pod, 8)
    pin = agent_record(cri, pod)["container"]["pin"]
    assert pin["type"] == "ssh-ed25519", pin

    for kill in (False, True):
        down = restart(cri, kill)
        seen = ticks(cri, pod)[-1]
        print(f"[vm-image] criv {'killed' if kill else 'stopped'} and back in {down:.1f} s")
        assert cri.pod_status(pod).state == api_pb2.SANDBOX_READY
        st = cri.status(cid)
        assert (st.state, st.started_at) == (api_pb2.CONTAINER_RUNNING, started), st
        t0 = time.monotonic()
        r = cri.exec(cid, ["sh", "-c", "hostname; cat /proc/uptime"], timeout=60)
        print(f"[vm-image] first ExecSync after the restart: {time.monotonic() - t0:.1f} s")
        assert r.exit_code == 0 and r.stdout.startswith(b"vmr\n"), (r, cri.proc.logs())
        assert agent_record(cri, pod)["container"]["pin"] == pin  # the same host key
        wait_ticks_past(cri, pod, seen + 8)  # the console goes on into the log

    # every tick once, in order, across both restarts (lost or repeated lines would show)
    got = ticks(cri, pod)
    assert got == list(range(got[0], got[0] + len(got))), got
    assert got[0] == 0 and len(got) > 24, cri.log(pod, "vm")[-3000:]
    # a clean stop: the ACPI button, the guest powers off
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=120), timeout=200)
    st = cri.status(cid)
    assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 0, "Completed"), st
    assert domain_name(pod) not in criv_domains()
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    assert not (cri.proc.state_dir / "sandboxes" / pod).exists()


def test_vmimage_vm_gone_or_record_corrupt_while_criv_is_down(
    vm_cri_factory: Callable[..., Cri], registry: TestRegistry, test_disk: Path, tmp_path: Path
) -> None:
    cri = vm_cri_factory(runtime={"handlers": HANDLERS})
    ref = push_containerdisk(registry, test_disk, tmp_path)
    pull(cri, ref)
    gone, bad = cri.run_pod("gone", handler="vm-image"), cri.run_pod("bad", handler="vm-image")
    gone_c, bad_c = create(cri, gone, "vm", ref), create(cri, bad, "vm", ref)
    cri.start(gone_c)
    cri.start(bad_c)
    for cid in (gone_c, bad_c):
        assert cri.exec(cid, ["true"], timeout=180).exit_code == 0, cri.proc.logs()
    assert cri.exec(gone_c, ["sh", "-c", "echo last-words >/dev/console"]).exit_code == 0
    deadline = time.monotonic() + 30
    while "last-words" not in cri.log(gone, "vm"):
        assert time.monotonic() < deadline
        time.sleep(0.2)

    assert cri.proc.stop() == 0
    subprocess.run(
        ["virsh", "-c", "qemu:///system", "destroy", domain_name(gone)],
        check=True, capture_output=True,
    )  # fmt: skip
    rec = cri.proc.state_dir / "sandboxes" / bad / "vmimage" / "agent.json"
    rec.write_text(rec.read_text()[:40])  # cut short: cannot be trusted
    if cri._exec_channel is not None:
        cri._exec_channel.close()
        cri._exec_channel = None
    cri.proc.start()

    # the VM that went: its container exited, how unknown; the pod serves on
    assert cri.pod_status(gone).state == api_pb2.SANDBOX_READY
    st = cri.status(gone_c)
    assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 255, "VMGone"), st
    assert "while criv was not running" in st.message, st.message
    assert "last-words" in cri.log(gone, "vm")
    cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=gone_c), timeout=60)
    nxt = create(cri, gone, "vm2", ref)  # kubelet's next attempt
    cri.start(nxt)
    cri.rt.StopContainer(api_pb2.StopContainerRequest(container_id=nxt, timeout=0), timeout=60)
    st = cri.status(nxt)
    assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 137, "Killed"), st

    # the corrupt record: not taken back, its VM destroyed, the pod NOTREADY
    assert cri.pod_status(bad).state == api_pb2.SANDBOX_NOTREADY
    st = cri.status(bad_c)
    assert (st.state, st.reason) == (api_pb2.CONTAINER_EXITED, "AgentGone"), st
    assert domain_name(bad) not in criv_domains()
    assert "not taken back" in cri.proc.log_path.read_text(errors="replace")
    for pod in (gone, bad):
        cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
        cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    assert not {domain_name(gone), domain_name(bad)} & criv_domains()
