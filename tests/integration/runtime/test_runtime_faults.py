"""Faults outside criv, through a real criv in host mode: a host command that hangs is
killed at its deadline and the RPC says so; records criv cannot read are quarantined at
start-up, nothing of theirs is touched and the other pods work; a CNI DEL that fails
while a RunPodSandbox is undone is kept and retried until the IPAM address is free."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from criv.config import load_config
from criv.doctor import check_state
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import BRIDGE, SUBNET, SUBNET_PREFIX, Cri, config_for
from tests.support.daemon import CRIV
from tests.support.fixtures import TestRegistry

pytestmark = pytest.mark.integration

HANG_MARK = "sleep 3001"  # the hung command's child, found by its command line


def _procs_with(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _mounted(path: Path) -> bool:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return any(line.split()[4] == str(path) for line in lines)


def _doctor(cri: Cri) -> str:
    """`criv doctor`'s output (its exit status depends on the machine's VM support)."""
    r = subprocess.run(
        [str(CRIV), "doctor", "--config", str(cri.proc.config_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return r.stdout + r.stderr


def _verbose_pid(cri: Cri, pod: str) -> int:
    info = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=10
    ).info["info"]
    return int(json.loads(info)["pid"])


@pytest.mark.timeout(180)
def test_a_hung_host_command_is_killed_at_its_deadline(
    cri_factory: Callable[..., Cri], tmp_path: Path
) -> None:
    # crun as criv itself runs it (reaping a pod's containers after its agent stopped)
    # hangs once, with a child in its process group; the agent's own crun calls pass.
    real = shutil.which("crun")
    assert real is not None
    bindir = tmp_path / "bin"
    bindir.mkdir()
    mark = tmp_path / "hang-once"
    wrapper = bindir / "crun"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ -e {mark} ] && tr "\\0" " " < /proc/$PPID/cmdline | grep -q "criv serve"; then\n'
        f"  rm -f {mark}; {HANG_MARK}; exit 0\n"
        "fi\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    cri = cri_factory(runtime={"crun": str(wrapper)}, timeouts={"commands": {"crun": 2}})
    pod = cri.run_pod("hang")
    cri.run(pod, "c", ["sleep", "1000"])
    mark.touch()
    with pytest.raises(grpc.RpcError) as e:
        cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    assert "'crun'" in e.value.details() and "killed" in e.value.details()
    assert not mark.exists(), "the hang was reached"
    assert _wait(lambda: not _procs_with(HANG_MARK)), "the hung command's child survived"
    # the pod's lock was released: the retry (kubelet's) stops and removes it
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)


@pytest.mark.timeout(240)
def test_unreadable_records_are_quarantined_and_kept(cri: Cri) -> None:
    state = Path(cri.proc.config["state_dir"])
    good = cri.run_pod("good")
    good_c = cri.run(good, "c", ["sleep", "1000"])
    bad = cri.run_pod("badpod")
    bad_c = cri.run(bad, "c", ["sleep", "1000"])
    other = cri.run_pod("badctr")
    other_c = cri.run(other, "c", ["sleep", "1000"])
    bad_agent = _verbose_pid(cri, bad)
    bad_dir = state / "sandboxes" / bad
    other_cdir = state / "sandboxes" / other / "containers" / other_c
    pod_rec, ctr_rec = bad_dir / "sandbox.json", other_cdir / "container.json"
    saved = {pod_rec: pod_rec.read_bytes(), ctr_rec: ctr_rec.read_bytes()}
    cri.proc.stop()
    pod_rec.write_text('{"version": 2, "kind": "sandbox", "data": {"trunc')
    ctr_rec.write_bytes(b"\0" * 64)

    cri.proc.start()  # starts despite both
    listed = {p.id for p in cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items}
    assert listed == {good, other}
    assert cri.exec(good_c, ["echo", "alive"]).stdout == b"alive\n"
    with pytest.raises(grpc.RpcError) as e:
        cri.status(other_c)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # nothing of the unreadable ones was removed, unmounted, killed or released
    assert _mounted(bad_dir / "containers" / bad_c / "rootfs")
    assert _mounted(other_cdir / "rootfs")
    assert os.path.exists(f"/proc/{bad_agent}")
    assert cri.exec(good_c, ["true"]).exit_code == 0
    doctor = _doctor(cri)
    assert f"WARN quarantined pod {bad[:12]}" in doctor, doctor
    assert f"WARN quarantined container {other_c[:12]}" in doctor, doctor

    # The operator repairs the records and puts them back: the next start takes them
    # (and drops the notes); kubelet's teardown then removes everything.
    cri.proc.stop()
    for path, data in saved.items():
        path.write_bytes(data)
    cri.proc.start()
    listed = {p.id for p in cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items}
    assert listed == {good, bad, other}
    assert "OK   state: no quarantined records" in _doctor(cri)
    assert cri.exec(bad_c, ["true"]).exit_code == 0


def _flaky_cni(tmp_path: Path) -> tuple[dict[str, Any], Path, Path]:
    """A conflist whose bridge refuses DEL until ``allow`` exists and whose second
    plugin refuses every ADD (so RunPodSandbox fails after the address was taken)."""
    d = tmp_path / "cni"
    (d / "bin").mkdir(parents=True)
    (d / "net.d").mkdir()
    allow = d / "allow-del"
    flaky = d / "bin" / "flakybridge"
    flaky.write_text(
        "#!/bin/sh\n"
        f'if [ "$CNI_COMMAND" = DEL ] && [ ! -e {allow} ]; then\n'
        '  echo \'{"cniVersion": "1.0.0", "code": 11, "msg": "injected DEL failure"}\'\n'
        "  exit 1\n"
        "fi\n"
        "exec /usr/lib/cni/bridge\n"
    )
    failadd = d / "bin" / "failadd"
    failadd.write_text(
        "#!/bin/sh\n"
        'if [ "$CNI_COMMAND" = ADD ]; then\n'
        '  echo \'{"cniVersion": "1.0.0", "code": 11, "msg": "injected ADD failure"}\'\n'
        "  exit 1\n"
        "fi\n"
    )
    for f in (flaky, failadd):
        f.chmod(0o755)
    ipam = d / "ipam"
    conf = {
        "cniVersion": "1.0.0",
        "name": "flaky",
        "plugins": [
            {
                "type": "flakybridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam),
                    "ranges": [[{"subnet": SUBNET}]],  # the bridge has its gateway
                },
            },
            {"type": "failadd"},
        ],
    }
    (d / "net.d" / "10-flaky.conflist").write_text(json.dumps(conf))
    cni = {"cni": {"conf_dir": str(d / "net.d"), "bin_dirs": [str(d / "bin"), "/usr/lib/cni"]}}
    return cni, ipam / "flaky", allow


def _addresses(ipam: Path) -> list[str]:
    return sorted(p.name for p in ipam.glob(f"{SUBNET_PREFIX}*")) if ipam.is_dir() else []


@pytest.mark.timeout(240)
def test_a_failed_cni_del_is_kept_and_retried_until_the_address_is_free(
    criv_factory: Callable[..., Any],
    registry: TestRegistry,
    cni_overrides: dict[str, Any],  # the suite's bridge, made up front
    tmp_path: Path,
) -> None:
    cni, ipam, allow = _flaky_cni(tmp_path)
    cri = Cri(criv_factory(config_for(registry, cni)), registry.busybox_ref, tmp_path / "logs")
    cri._pods = {}
    try:
        _del_is_retried(cri, ipam, allow)
    finally:
        allow.touch()  # a failed run leaves nothing: the start-up retry frees it
        cri.proc.restart()
        cri.teardown()


def _del_is_retried(cri: Cri, ipam: Path, allow: Path) -> None:
    state = Path(cri.proc.config["state_dir"])
    pending = state / "cni-pending"

    def run_failing(name: str) -> None:
        with pytest.raises(grpc.RpcError) as e:
            cri.run_pod(name)
        assert "injected ADD failure" in (e.value.details() or "")

    run_failing("first")
    assert len(_addresses(ipam)) == 1, "ADD took an address, DEL could not free it"
    (kept,) = pending.glob("*.json")
    assert json.loads(kept.read_text())["data"]["last_error"]
    assert f"WARN pending CNI DEL {kept.stem[:12]}" in _doctor(cri)
    # a restart retries (still failing: kept, with its netns)
    cri.proc.restart()
    assert len(list(pending.glob("*.json"))) == 1 and len(_addresses(ipam)) == 1
    assert json.loads(kept.read_text())["data"]["attempts"] >= 2
    # the plugin works again: the next start frees the address
    allow.touch()
    cri.proc.restart()
    assert _addresses(ipam) == [] and list(pending.glob("*.json")) == []

    # and without a restart: a pod's stop retries it
    allow.unlink()
    run_failing("second")
    assert len(_addresses(ipam)) == 1
    allow.touch()
    host = cri.run_pod(
        "hostnet",
        handler="host",
        linux=api_pb2.LinuxPodSandboxConfig(
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE)
            )
        ),
    )
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=host), timeout=60)
    assert _wait(lambda: _addresses(ipam) == []), "the pending DEL was not retried"
    assert _wait(lambda: list(pending.glob("*.json")) == [])
    assert check_state(load_config(cri.proc.config_path))[0].level == "OK"
