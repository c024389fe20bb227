"""CRI calls shaped the way kubelet makes them, for the e2e suite (tests/e2e).

Its own channel on criv's socket (kubelet's message limits) and the generated stubs;
pod and container configs with kubelet's labels, log layout
(``<log root>/<namespace>_<name>_<uid>/<container>/<attempt>.log``, directories made
by kubelet before the calls), DNS config and termination-log mount; CreateContainer
names the image by the ref PullImage returned, as kubelet does.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc

MAX_MESSAGE = 16 * 1024 * 1024  # kubelet's CRI client limit
DNS = api_pb2.DNSConfig(
    servers=["10.96.0.10"], searches=["default.svc.cluster.local"], options=["ndots:5"]
)


class Kubelet:
    def __init__(self, socket: Path, log_root: Path) -> None:
        self.channel = grpc.insecure_channel(
            f"unix:{socket}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)
        self.log_root = log_root

    def close(self) -> None:
        self.channel.close()

    def pod_config(self, name: str, namespace: str = "default") -> api_pb2.PodSandboxConfig:
        uid = f"uid-{name}"
        log_dir = self.log_root / f"{namespace}_{name}_{uid}"
        log_dir.mkdir(parents=True, exist_ok=True)
        labels = {
            "app": name,
            "io.kubernetes.pod.name": name,
            "io.kubernetes.pod.namespace": namespace,
            "io.kubernetes.pod.uid": uid,
        }
        return api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, namespace=namespace, uid=uid),
            hostname=name,
            log_directory=str(log_dir),
            dns_config=DNS,
            labels=labels,
            annotations={"kubernetes.io/config.source": "api"},
            linux=api_pb2.LinuxPodSandboxConfig(
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(
                        network=api_pb2.POD, pid=api_pb2.CONTAINER, ipc=api_pb2.POD
                    )
                )
            ),
        )

    def pull(self, image: str, pod: api_pb2.PodSandboxConfig) -> str:
        resp = self.images.PullImage(
            api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image), sandbox_config=pod),
            timeout=120,
        )
        return str(resp.image_ref)

    def run_pod(self, cfg: api_pb2.PodSandboxConfig, handler: str) -> str:
        req = api_pb2.RunPodSandboxRequest(config=cfg, runtime_handler=handler)
        return str(self.rt.RunPodSandbox(req, timeout=120).pod_sandbox_id)

    def container_config(
        self,
        pod: api_pb2.PodSandboxConfig,
        name: str,
        image_ref: str,
        user_image: str,
        command: list[str],
        args: list[str] | None = None,
        *,
        mounts: list[api_pb2.Mount] | None = None,
        envs: dict[str, str] | None = None,
        termination_log: Path | None = None,
        attempt: int = 0,
    ) -> api_pb2.ContainerConfig:
        (Path(pod.log_directory) / name).mkdir(exist_ok=True)
        all_mounts = list(mounts or [])
        if termination_log is not None:
            termination_log.touch()
            all_mounts.append(
                api_pb2.Mount(container_path="/dev/termination-log", host_path=str(termination_log))
            )
        return api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=name, attempt=attempt),
            image=api_pb2.ImageSpec(image=image_ref, user_specified_image=user_image),
            command=command,
            args=args or [],
            envs=[api_pb2.KeyValue(key=k, value=v.encode()) for k, v in (envs or {}).items()],
            mounts=all_mounts,
            labels={
                "io.kubernetes.container.name": name,
                "io.kubernetes.pod.name": pod.metadata.name,
                "io.kubernetes.pod.namespace": pod.metadata.namespace,
                "io.kubernetes.pod.uid": pod.metadata.uid,
            },
            annotations={"io.kubernetes.container.restartCount": str(attempt)},
            log_path=f"{name}/{attempt}.log",
            linux=api_pb2.LinuxContainerConfig(
                resources=api_pb2.LinuxContainerResources(
                    cpu_shares=102, memory_limit_in_bytes=128 * 1024 * 1024
                ),
            ),
        )

    def create_and_start(
        self, pod_id: str, pod: api_pb2.PodSandboxConfig, cfg: api_pb2.ContainerConfig
    ) -> str:
        req = api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=cfg, sandbox_config=pod)
        cid = str(self.rt.CreateContainer(req, timeout=60).container_id)
        self.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=60)
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

    def wait_exited(self, cid: str, timeout: float = 60) -> api_pb2.ContainerStatus:
        deadline = time.monotonic() + timeout
        while (st := self.status(cid)).state != api_pb2.CONTAINER_EXITED:
            assert time.monotonic() < deadline, f"container still {st.state}"
            time.sleep(0.1)
        return st

    def exec(self, cid: str, cmd: list[str], timeout: int = 10) -> api_pb2.ExecSyncResponse:
        resp: api_pb2.ExecSyncResponse = self.rt.ExecSync(
            api_pb2.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout),
            timeout=timeout + 30,
        )
        return resp

    def stop_and_remove_pod(self, pod_id: str) -> None:
        self.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=120)
        self.rt.RemovePodSandbox(
            api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=120
        )


def wait_for_log(path: Path, wanted: list[str], timeout: float = 60) -> str:
    """The CRI log at ``path`` once every string of ``wanted`` is in it."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if all(w in text for w in wanted):
            return text
        assert time.monotonic() < deadline, f"{path} lacks {wanted}:\n{text}"
        time.sleep(0.1)
