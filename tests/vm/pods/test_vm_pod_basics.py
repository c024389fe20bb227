"""vm pods through CRI: one VM per pod, containers in it, the network and the kernel its own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from criv.sandbox.vm.spares import is_spare_name
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.vm import GUEST_ROOT, PRIVILEGED_POD, criv_domains

pytestmark = pytest.mark.vm


def _verbose(cri: Cri, pod: str) -> dict[str, object]:
    resp = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=30
    )
    info: dict[str, object] = json.loads(resp.info["info"])
    return info


@pytest.mark.timeout(600)
def test_vm_pod_container_logs_exec_and_guest_kernel(vm_cri: Cri) -> None:
    t0 = time.monotonic()
    pod = vm_cri.run_pod("web")
    ready = time.monotonic() - t0
    st = vm_cri.pod_status(pod)
    assert st.state == api_pb2.SANDBOX_READY
    ip = st.network.ip
    assert ip.startswith("10.211."), ip
    info = _verbose(vm_cri, pod)
    assert info["isolation"] == "vm"
    iso = info["isolationState"]
    assert isinstance(iso, dict)
    # its own domain, or a spare VM it took (docs/vm.md, Spare VMs)
    assert iso["domain"] == "criv-" + pod[:32] or is_spare_name(iso["domain"])
    assert iso["accel"] == "tcg"
    assert os.path.exists(str(iso["console_log"]))

    cid = vm_cri.run(pod, "main", ["sh", "-c", "echo hello from $(uname -r); sleep 3600"])
    deadline = time.monotonic() + 60
    while "hello from" not in (log := _read(vm_cri, pod)):
        assert time.monotonic() < deadline, log
        time.sleep(0.2)
    guest_release = log.split("hello from ")[1].split()[0]
    assert guest_release != os.uname().release
    r = vm_cri.exec(cid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)
    # the guest took the pod IP: the host reaches it over the CNI bridge
    r = vm_cri.exec(cid, ["ip", "-o", "-4", "addr", "show"])
    assert ip in r.stdout.decode(), r.stdout
    vm_cri.run(pod, "server", ["sh", "-c", "while :; do echo pong | nc -l -p 8080; done"])
    assert _tcp_reply(ip, 8080, 60) == b"pong\n"
    print(f"RunPodSandbox -> READY {ready:.1f} s")

    vm_cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    st2 = vm_cri.status(cid)
    assert st2.state == api_pb2.CONTAINER_EXITED
    vm_cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)


def _tcp_reply(ip: str, port: int, timeout: float) -> bytes:
    """The host connects to the pod IP (over the CNI bridge, the veth, tc, the tap)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((ip, port), timeout=5) as s:
                data = s.recv(100)
                if data:
                    return data
        except OSError:
            pass
        assert time.monotonic() < deadline, f"no TCP answer from {ip}:{port}"
        time.sleep(0.3)


def _read(cri: Cri, pod: str) -> str:
    try:
        return cri.log(pod, "main")
    except OSError:
        return ""


@pytest.mark.timeout(600)
def test_two_containers_share_localhost_and_an_empty_dir(vm_cri: Cri, tmp_path: Path) -> None:
    vol = tmp_path / "empty-dir"
    vol.mkdir()
    mount = api_pb2.Mount(container_path="/data", host_path=str(vol))
    pod = vm_cri.run_pod("pair")
    web = "mkdir -p /www && echo pong >/www/index.html && echo from-web >/data/a && " \
        "exec httpd -f -p 8080 -h /www"  # fmt: skip
    a = vm_cri.run(pod, "web", ["sh", "-c", web], mounts=[mount])
    b = vm_cri.run(pod, "client", ["sleep", "3600"], mounts=[mount])
    deadline = time.monotonic() + 60
    while True:
        r = vm_cri.exec(b, ["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"])
        if r.exit_code == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert r.stdout == b"pong\n", (r.exit_code, r.stderr)
    assert vm_cri.exec(b, ["cat", "/data/a"]).stdout == b"from-web\n"
    assert vm_cri.exec(b, ["sh", "-c", "echo from-client >/data/b"]).exit_code == 0
    # the volume is the host directory kubelet gave, seen through the pod's 9p share
    assert (vol / "a").read_text() == "from-web\n"
    assert (vol / "b").read_text() == "from-client\n"
    for cid in (a, b):
        vm_cri.rt.StopContainer(
            api_pb2.StopContainerRequest(container_id=cid, timeout=0), timeout=60
        )
        vm_cri.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=60)
    # removing the containers took their binds out of the shared dir, not the volume
    assert (vol / "a").exists()
    missing = api_pb2.Mount(container_path="/x", host_path=str(tmp_path / "no-such-dir"))
    with pytest.raises(grpc.RpcError) as e:
        vm_cri.create(pod, "bad", ["true"], mounts=[missing])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "no-such-dir" in (e.value.details() or "")
    assert not vm_cri.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers


@pytest.mark.timeout(600)
def test_an_oom_kill_inside_a_running_container_is_noticed_as_it_happens(vm_cri: Cri) -> None:
    # the guest's cgroup v2 memory.events, watched with inotify (criv_agent/oomwatch.py):
    # no poll would catch it any more. A child is the victim (oom_score_adj 1000), the
    # container's init lives on.
    pod = vm_cri.run_pod("oom-child")
    limit = api_pb2.LinuxContainerResources(memory_limit_in_bytes=32 * 1024 * 1024)
    hog = "(echo 1000 >/proc/self/oom_score_adj; x=a; while :; do x=$x$x; done); sleep 3600"
    cid = vm_cri.run(pod, "main", ["sh", "-c", hog], resources=limit)
    console = Path(vm_cri.isolation_state(pod)["console_log"])
    line = f"container {cid[:12]}: a process in it was OOM-killed (1 so far)"
    deadline = time.monotonic() + 120
    while line not in console.read_text(errors="replace"):
        assert time.monotonic() < deadline, "no OOM kill noticed while the container ran"
        time.sleep(0.5)
    assert vm_cri.status(cid).state == api_pb2.CONTAINER_RUNNING


@pytest.mark.timeout(600)
def test_qemu_killed_makes_the_pod_notready_and_removal_leaves_nothing(
    vm_cri_factory: Callable[..., Cri],
) -> None:
    cri = vm_cri_factory(vm={"accel": "auto"})  # this one also runs the KVM probe
    pod = cri.run_pod("doomed")
    status = cri.rt.Status(api_pb2.StatusRequest(verbose=True), timeout=30)
    vm_info = json.loads(status.info["info"])["vm"]
    assert vm_info["accel"] in ("kvm", "tcg") and vm_info["accelReason"], vm_info
    assert "vhost-user-vsock" in vm_info["vsock"]
    cid = cri.run(pod, "sleeper", ["sleep", "3600"])
    iso = _verbose(cri, pod)["isolationState"]
    assert isinstance(iso, dict) and iso["accel"] == vm_info["accel"]
    domain = str(iso["domain"])
    pid = int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text())
    assert f"guest={domain}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    os.kill(pid, signal.SIGKILL)  # this test's own VM
    deadline = time.monotonic() + 60
    while cri.pod_status(pod).state != api_pb2.SANDBOX_NOTREADY:
        assert time.monotonic() < deadline, "pod still READY after its QEMU was killed"
        time.sleep(0.2)
    st = cri.status(cid)
    assert st.state == api_pb2.CONTAINER_EXITED and st.reason == "VMExited", st
    assert st.exit_code == 137
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    assert not cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
    assert not cri.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers
    assert domain not in criv_domains()


@pytest.mark.timeout(300)
def test_host_network_pod_is_refused_in_vm_mode(vm_cri: Cri) -> None:
    ns = api_pb2.NamespaceOption(network=api_pb2.NODE)
    linux = api_pb2.LinuxPodSandboxConfig(
        security_context=api_pb2.LinuxSandboxSecurityContext(namespace_options=ns)
    )
    with pytest.raises(grpc.RpcError) as e:
        vm_cri.run_pod("hostnet", linux=linux)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "host" in (e.value.details() or "")
    assert not vm_cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items


@pytest.mark.timeout(600)
def test_restart_collects_a_vm_whose_record_is_gone(vm_cri: Cri) -> None:
    """Domains and backends outlive criv; one no record owns any more is swept at start."""
    pod = vm_cri.run_pod("orphan")
    vm_cri.run(pod, "sleeper", ["sleep", "3600"])
    iso = _verbose(vm_cri, pod)["isolationState"]
    assert isinstance(iso, dict)
    domain, backend = str(iso["domain"]), int(iso["backend_pid"])
    vm_cri.proc.stop()
    assert domain in criv_domains() and Path(f"/proc/{backend}").exists()  # still running
    state = Path(vm_cri.proc.config["state_dir"]) / "sandboxes" / pod
    # gone, not unreadable: an unreadable record is quarantined with all it owns (tested
    # in tests/integration/runtime/test_runtime_faults.py)
    (state / "sandbox.json").unlink()
    vm_cri.proc.start()
    assert domain not in criv_domains()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{backend}").exists():
        assert time.monotonic() < deadline, "vsock backend survived the sweep"
        time.sleep(0.1)
    assert not state.exists()
    assert not vm_cri.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items


@pytest.mark.timeout(600)
def test_root_dax_off_reads_the_root_from_a_read_only_disk(
    vm_cri_factory: Callable[..., Cri],
) -> None:
    """``vm.root_dax: false``: the guest root is a read-only virtio disk (no page of it is
    mapped into two VMs); the default, a DAX-mapped pmem device, is every other test's."""
    cri = vm_cri_factory(vm={"root_dax": False, "template": "off"})
    pod = cri.run_pod("disk-root", linux=PRIVILEGED_POD)
    cid = cri.run(pod, "root", ["sleep", "3600"], security=GUEST_ROOT)
    domain = str(cri.isolation_state(pod)["domain"])
    xml = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", domain],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "<readonly/>" in xml and "root.erofs" in xml and "virtio-pmem" not in xml
    r = cri.exec(cid, ["nsenter", "-t", "1", "-m", "--", "ls", "/sys/fs/erofs"], timeout=60)
    assert r.exit_code == 0 and "vda" in r.stdout.decode().split(), r
