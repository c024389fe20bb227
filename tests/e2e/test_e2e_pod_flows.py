"""Whole pod flows as kubelet drives them, through criv's socket, in `host` and `vm` mode.

Pull from the test registry, RunPodSandbox, a container with volumes (read-write,
read-only, the termination-log file) and a CRI log path, ExecSync, the CRI log file,
ContainerStatus, Exec and PortForward through the streaming URLs, then StopPodSandbox
and RemovePodSandbox and RemoveImage; the suite-wide leak checks (and, in vm mode, the
libvirt domain check) see that nothing is left. A second flow restarts criv while the pod
runs: the pod and its container are re-adopted and take new work.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import SUBNET_PREFIX, Cri
from tests.support.kubelet import Kubelet, wait_for_log
from tests.support.scenarios import CRI_LOG_LINE, log_records
from tests.support.spdy_client import SpdyClient, forward_one, spdy_exec
from tests.support.streaming import ECHO_PORT, ECHO_SERVER, connect_once

pytestmark = pytest.mark.e2e

APP = ["sh", "-c"]
APP_ARGS = [
    "echo started $GREETING; echo warn >&2; echo from-container >/data/out; "
    "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done"
]


def _volumes(tmp_path: Path) -> tuple[Path, Path, list[api_pb2.Mount]]:
    data = tmp_path / "volumes" / "data"
    config = tmp_path / "volumes" / "config"
    data.mkdir(parents=True)
    config.mkdir()
    (config / "settings").write_text("color=blue\n")
    mounts = [
        api_pb2.Mount(container_path="/data", host_path=str(data)),
        api_pb2.Mount(container_path="/config", host_path=str(config), readonly=True),
    ]
    return data, config, mounts


def _handler_ready(k: Kubelet, mode: str) -> None:
    v = k.rt.Version(api_pb2.VersionRequest(version="v1"), timeout=10)
    assert (v.runtime_name, v.runtime_api_version) == ("criv", "v1")
    st = k.rt.Status(api_pb2.StatusRequest(), timeout=10)
    conds = {c.type: (c.status, c.reason, c.message) for c in st.status.conditions}
    assert conds["RuntimeReady"][0] and conds["NetworkReady"][0], conds
    assert mode in {h.name for h in st.runtime_handlers}


async def _streaming(k: Kubelet, pod: str, cid: str) -> None:
    """Exec with stdin over SPDY, and one forwarded connection to the echo container."""
    url = k.rt.Exec(
        api_pb2.ExecRequest(
            container_id=cid, cmd=["sh", "-c", "cat; echo err >&2; exit 3"],
            stdin=True, stdout=True, stderr=True,
        ),
        timeout=10,
    ).url  # fmt: skip
    r = await spdy_exec(url, stdin=b"through the streaming server\n")
    assert (r.stdout, r.stderr) == (b"through the streaming server\n", b"err\n")
    assert r.status["reason"] == "NonZeroExitCode", r.status
    url = k.rt.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=pod), timeout=10).url
    _resp, c = await SpdyClient.connect(url, ["portforward.k8s.io"])
    assert c is not None
    try:
        rid = 1
        async with asyncio.timeout(60):  # until the echo server listens in the pod
            while await connect_once(c, ECHO_PORT, rid):
                rid += 1
                await asyncio.sleep(0.2)
        payload = os.urandom(100_000)
        assert await forward_one(c, ECHO_PORT, rid + 1, payload) == payload
    finally:
        await c.close()


@pytest.mark.timeout(600)
def test_pod_flow(criv_mode: Cri, mode: str, tmp_path: Path) -> None:
    image = criv_mode.image
    state = criv_mode.proc.state_dir
    data, config, mounts = _volumes(tmp_path)
    term_log = tmp_path / "volumes" / "termination-log"
    with contextlib.closing(Kubelet(criv_mode.proc.socket, tmp_path / "pods")) as k:
        _handler_ready(k, mode)
        pod_cfg = k.pod_config("web")
        image_ref = k.pull(image, pod_cfg)
        img = k.images.ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image)), timeout=10
        ).image
        assert img.id == image_ref and image in img.repo_tags

        pod = k.run_pod(pod_cfg, mode)
        pst = k.pod_status(pod)
        assert pst.state == api_pb2.SANDBOX_READY
        assert pst.network.ip.startswith(SUBNET_PREFIX), pst.network.ip
        assert pst.metadata == pod_cfg.metadata and pst.runtime_handler == mode
        assert dict(pst.labels) == dict(pod_cfg.labels)
        assert dict(pst.annotations) == dict(pod_cfg.annotations)

        cfg = k.container_config(
            pod_cfg, "app", image_ref, image, APP, APP_ARGS,
            mounts=mounts, envs={"GREETING": "hi"}, termination_log=term_log,
        )  # fmt: skip
        cid = k.create_and_start(pod, pod_cfg, cfg)
        echo_cfg = k.container_config(pod_cfg, "echo", image_ref, image, ECHO_SERVER)
        echo = k.create_and_start(pod, pod_cfg, echo_cfg)

        log_path = Path(pod_cfg.log_directory) / "app" / "0.log"
        text = wait_for_log(log_path, ["started hi", "warn", "tick 3"])
        lines = text.splitlines()
        assert all(CRI_LOG_LINE.match(line) for line in lines), lines
        records = log_records(text)
        assert ("stdout", "F", "started hi") in records
        assert ("stderr", "F", "warn") in records

        st = k.status(cid)
        assert st.state == api_pb2.CONTAINER_RUNNING and st.started_at > 0
        assert st.metadata == cfg.metadata
        assert st.image_id == image_ref and st.image_ref in img.repo_digests, st
        assert st.log_path == str(log_path)
        assert dict(st.labels) == dict(cfg.labels)
        assert st.resources.linux.memory_limit_in_bytes == 128 * 1024 * 1024
        assert {(m.container_path, m.host_path, m.readonly) for m in st.mounts} == {
            ("/data", str(data), False),
            ("/config", str(config), True),
            ("/dev/termination-log", str(term_log), False),
        }

        r = k.exec(cid, ["sh", "-c", "hostname; cat /data/out /config/settings"])
        assert (r.exit_code, r.stdout) == (0, b"web\nfrom-container\ncolor=blue\n"), r.stderr
        assert (data / "out").read_text() == "from-container\n"
        (data / "from-host").write_text("written on the host\n")
        r = k.exec(cid, ["cat", "/data/from-host"])
        assert r.stdout == b"written on the host\n", r.stderr
        r = k.exec(cid, ["sh", "-c", "echo x >/config/new"])
        assert r.exit_code != 0 and b"Read-only file system" in r.stderr, r
        assert not (config / "new").exists()
        r = k.exec(cid, ["sh", "-c", "echo bye >/dev/termination-log"])
        assert r.exit_code == 0, r.stderr
        assert term_log.read_text() == "bye\n"
        resolv = k.exec(cid, ["cat", "/etc/resolv.conf"]).stdout.decode()
        assert "nameserver 10.96.0.10" in resolv and "ndots:5" in resolv, resolv

        asyncio.run(_streaming(k, pod, echo))

        k.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
        assert k.pod_status(pod).state == api_pb2.SANDBOX_NOTREADY
        for c in (cid, echo):
            assert k.status(c).state == api_pb2.CONTAINER_EXITED
        k.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)
        assert not k.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
        assert not k.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers
        with pytest.raises(grpc.RpcError) as e:
            k.status(cid)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert not (state / "sandboxes" / pod).exists()
        # what kubelet owns stays: the volumes and the log files
        assert (data / "out").exists() and (config / "settings").read_text() == "color=blue\n"
        assert "tick 3" in log_path.read_text()

        k.images.RemoveImage(
            api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image_ref)), timeout=30
        )
        assert not k.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images
        layers = state / "images" / "layers"
        assert not [p for p in layers.iterdir() if not p.name.startswith(".")]


@pytest.mark.timeout(600)
def test_pod_survives_criv_restart(criv_mode: Cri, mode: str, tmp_path: Path) -> None:
    image = criv_mode.image
    data, _config, mounts = _volumes(tmp_path)
    with contextlib.closing(Kubelet(criv_mode.proc.socket, tmp_path / "pods")) as k:
        pod_cfg = k.pod_config("survivor")
        image_ref = k.pull(image, pod_cfg)
        pod = k.run_pod(pod_cfg, mode)
        ip = k.pod_status(pod).network.ip
        cfg = k.container_config(
            pod_cfg, "app", image_ref, image, APP, APP_ARGS, mounts=mounts,
            envs={"GREETING": "before"},
        )  # fmt: skip
        cid = k.create_and_start(pod, pod_cfg, cfg)
        log_path = Path(pod_cfg.log_directory) / "app" / "0.log"
        wait_for_log(log_path, ["started before", "tick 2"])
        started_at = k.status(cid).started_at
        assert k.exec(cid, ["cat", "/data/out"]).stdout == b"from-container\n"

    criv_mode.proc.restart()

    with contextlib.closing(Kubelet(criv_mode.proc.socket, tmp_path / "pods")) as k:
        pods = k.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
        assert [(p.id, p.state) for p in pods] == [(pod, api_pb2.SANDBOX_READY)]
        pst = k.pod_status(pod)
        assert pst.state == api_pb2.SANDBOX_READY and pst.network.ip == ip
        st = k.status(cid)
        assert st.state == api_pb2.CONTAINER_RUNNING, st
        assert st.started_at == started_at
        # the container kept running and its log goes on, each line once
        seen = len(log_path.read_text().splitlines())
        text = wait_for_log(log_path, [f"tick {seen + 2}"])
        ticks = [c for s, _, c in log_records(text) if s == "stdout" and c.startswith("tick ")]
        assert ticks == [f"tick {i}" for i in range(len(ticks))]
        r = k.exec(cid, ["sh", "-c", "echo again >>/data/out; cat /data/out"])
        assert r.stdout == b"from-container\nagain\n", r.stderr
        # the re-adopted pod takes a new container
        cfg2 = k.container_config(
            pod_cfg, "later", image_ref, image, ["sh", "-c", "cat /data/out; exit 5"],
            mounts=mounts,
        )  # fmt: skip
        later = k.create_and_start(pod, pod_cfg, cfg2)
        later_log = Path(pod_cfg.log_directory) / "later" / "0.log"
        text = wait_for_log(later_log, ["again"])
        assert [c for _, _, c in log_records(text)] == ["from-container", "again"]
        assert k.wait_exited(later).exit_code == 5
        assert (data / "out").read_text() == "from-container\nagain\n"

        k.stop_and_remove_pod(pod)
        assert not k.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
        assert not (criv_mode.proc.state_dir / "sandboxes" / pod).exists()
