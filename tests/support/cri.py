"""A real criv through CRI, for the runtime and streaming suites: host isolation, real
crun, real CNI from /usr/lib/cni with criv's default conflist in a tmp conf dir, busybox
from the loopback registry pulled through CRI, and helpers to drive pods/containers.

Import the fixtures into a conftest (or test module) to use them. Beyond the suite-wide
leak check (processes, netns, mounts, links), ``no_cgroup_leaks`` (autouse where
imported) also checks that no cgroup made for a pod is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc
from tests.support.daemon import CrivProcess, merge
from tests.support.fixtures import TestRegistry, registry  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
# A bridge and subnet of the suite's own, so that a criv (or the lifecycle bench)
# running on the same machine with the default conflist never shares IPAM ranges.
BRIDGE = "crivtest0"
SUBNET = "10.211.0.0/16"
SUBNET_PREFIX = "10.211."
CGROUP_ROOTS = [Path("/sys/fs/cgroup") / c / "criv" for c in ("memory", "pids", "cpu", "unified")]
CGROUP_ROOTS.append(Path("/sys/fs/cgroup/criv"))


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("crun", "nsenter", "unshare", "iptables"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not Path("/usr/lib/cni/bridge").exists():
        return "needs containernetworking-plugins in /usr/lib/cni"
    return None


@pytest.fixture(scope="session")
def cni_overrides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """criv config keys pointing CNI at criv's default conflist in a tmp conf dir.

    The bridge is made up front (and removed at the end) so that the per-test link
    check does not count the bridge the first pod creates as a leak.
    """
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("cni")
    conf = json.loads((REPO / "etc/cni/10-criv.conflist").read_text())
    conf["plugins"][0]["ipam"]["dataDir"] = str(d / "ipam")  # not /var/lib/cni
    conf["plugins"][0]["bridge"] = BRIDGE
    conf["plugins"][0]["ipam"]["ranges"] = [[{"subnet": SUBNET}]]
    (d / "net.d").mkdir()
    (d / "net.d" / "10-criv.conflist").write_text(json.dumps(conf))
    created = subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0
    if created:
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
    yield {"cni": {"conf_dir": str(d / "net.d"), "bin_dirs": ["/usr/lib/cni"]}}
    if created:
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def _cgroups() -> set[str]:
    """Pod and container cgroups; the shared /criv parent itself may come and go."""
    out: set[str] = set()
    for root in CGROUP_ROOTS:
        if root.is_dir():
            for dirpath, _dirs, _files in os.walk(root):
                if dirpath != str(root):
                    out.add(dirpath)
    return out


def _holders() -> set[int]:
    """The agent's namespace holders (not in the suite-wide process watch list)."""
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"criv_agent/holder.py" in (d / "cmdline").read_bytes():
                    out.add(int(d.name))
            except OSError:
                continue
    return out


@pytest.fixture(autouse=True)
def no_cgroup_leaks() -> Iterator[None]:
    """Also fails a test that leaves a pod cgroup or a namespace holder behind."""
    before, holders = _cgroups(), _holders()
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = _cgroups() - before
        stray = _holders() - holders
        if not (leaked or stray) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not leaked, f"cgroups left behind: {sorted(leaked)}"
    assert not stray, f"namespace holders left behind: {sorted(stray)}"


class Cri:
    """A started criv plus helpers; every call goes through the real socket."""

    def __init__(self, proc: CrivProcess, image: str, logs: Path) -> None:
        self.proc = proc
        self.image = image
        self.logs = logs
        self._n = 0
        self._exec_channel: grpc.Channel | None = None

    @property
    def rt(self) -> Any:
        return self.proc.runtime

    def pull(self) -> None:
        self.proc.images.PullImage(
            api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=self.image)), timeout=120
        )

    def pod_config(self, name: str | None = None, **kw: Any) -> api_pb2.PodSandboxConfig:
        self._n += 1
        name = name or f"pod{self._n}"
        cfg = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(
                name=name, namespace="default", uid=f"uid-{name}", attempt=0
            ),
            hostname=name,
            log_directory=str(self.logs / name),
            labels={"app": name},
            **kw,
        )
        return cfg

    # the runtime handler run_pod uses when the test names none (the vm suite sets "vm")
    default_handler = ""

    def run_pod(self, name: str | None = None, handler: str | None = None, **kw: Any) -> str:
        cfg = self.pod_config(name, **kw)
        h = self.default_handler if handler is None else handler
        resp = self.rt.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(config=cfg, runtime_handler=h), timeout=120
        )
        self._pods[resp.pod_sandbox_id] = cfg
        return str(resp.pod_sandbox_id)

    _pods: dict[str, api_pb2.PodSandboxConfig]

    def create(
        self,
        pod_id: str,
        name: str,
        command: list[str],
        *,
        security: api_pb2.LinuxContainerSecurityContext | None = None,
        resources: api_pb2.LinuxContainerResources | None = None,
        **kw: Any,
    ) -> str:
        linux = api_pb2.LinuxContainerConfig()
        if security is not None:
            linux.security_context.CopyFrom(security)
        if resources is not None:
            linux.resources.CopyFrom(resources)
        cfg = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=name),
            image=api_pb2.ImageSpec(image=self.image),
            command=command,
            log_path=f"{name}.log",
            linux=linux,
            **kw,
        )
        resp = self.rt.CreateContainer(
            api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=cfg, sandbox_config=self._pods[pod_id]
            ),
            timeout=60,
        )
        return str(resp.container_id)

    def start(self, cid: str) -> None:
        self.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=60)

    def run(self, pod_id: str, name: str, command: list[str], **kw: Any) -> str:
        cid = self.create(pod_id, name, command, **kw)
        self.start(cid)
        return cid

    def status(self, cid: str) -> api_pb2.ContainerStatus:
        resp: api_pb2.ContainerStatusResponse = self.rt.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id=cid), timeout=30
        )
        return resp.status

    def pod_status(self, pod_id: str) -> api_pb2.PodSandboxStatus:
        resp: api_pb2.PodSandboxStatusResponse = self.rt.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=30
        )
        return resp.status

    def isolation_state(self, pod_id: str) -> dict[str, Any]:
        """The pod's ``isolationState`` from PodSandboxStatus's verbose info."""
        resp = self.rt.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True), timeout=30
        )
        iso: dict[str, Any] = json.loads(resp.info["info"])["isolationState"]
        return iso

    def wait_exited(self, cid: str, timeout: float = 30) -> api_pb2.ContainerStatus:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(cid)
            if st.state == api_pb2.CONTAINER_EXITED:
                return st
            assert time.monotonic() < deadline, f"container still {st.state}"
            time.sleep(0.05)

    def exec(self, cid: str, cmd: list[str], timeout: int = 10) -> api_pb2.ExecSyncResponse:
        # kubelet's CRI client takes messages up to 16 MiB; grpc's default is 4 MiB.
        if self._exec_channel is None:
            self._exec_channel = grpc.insecure_channel(
                f"unix:{self.proc.socket}",
                options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)],
            )
        stub = api_pb2_grpc.RuntimeServiceStub(self._exec_channel)
        resp: api_pb2.ExecSyncResponse = stub.ExecSync(
            api_pb2.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout),
            timeout=timeout + 30,
        )
        return resp

    def log(self, pod_id: str, name: str) -> str:
        return (self.logs / self._pods[pod_id].metadata.name / f"{name}.log").read_text()

    def teardown(self) -> None:
        """Stop and remove every pod (idempotent), as kubelet would."""
        if self._exec_channel is not None:
            self._exec_channel.close()
        if self.proc._channel is None:
            return
        try:
            for p in self.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items:
                req = api_pb2.StopPodSandboxRequest(pod_sandbox_id=p.id)
                self.rt.StopPodSandbox(req, timeout=60)
                self.rt.RemovePodSandbox(
                    api_pb2.RemovePodSandboxRequest(pod_sandbox_id=p.id), timeout=60
                )
        except grpc.RpcError as e:
            print(f"teardown failed: {e}\n--- criv's log (tail) ---\n{self.proc.logs()}")
            raise


# criv's default handler is `vm`; these suites test the agent in host isolation unless a
# test (or the vm suite, tests/vm/pods) asks for `vm`.
HOST_HANDLERS = {"": "host", "host": "host", "vm": "vm"}


def config_for(reg: TestRegistry, cni: dict[str, Any], **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "registries": {"insecure": [reg.host]},
        "runtime": {"handlers": dict(HOST_HANDLERS)},
        **cni,
    }
    return merge(cfg, extra)


@pytest.fixture
def cri_factory(
    criv_factory: Any,
    registry: TestRegistry,  # noqa: F811  (the imported fixture)
    cni_overrides: dict[str, Any],
    tmp_path: Path,
) -> Iterator[Callable[..., Cri]]:
    made: list[Cri] = []

    def make(pull: bool = True, **extra: Any) -> Cri:
        proc = criv_factory(config_for(registry, cni_overrides, **extra))
        c = Cri(proc, registry.busybox_ref, tmp_path / "logs")
        c._pods = {}
        made.append(c)
        if pull:
            c.pull()
        return c

    yield make
    for c in made:
        c.teardown()


@pytest.fixture
def cri(cri_factory: Callable[..., Cri]) -> Cri:
    return cri_factory()
