"""Streaming benchmark: exec round-trip latency and stdout throughput.

Measures, in one run, the same client (the facts-sheet SPDY client from the tests)
against:

* criv's streaming server (a child process, so the server and the client do not share
  an event loop or a GIL), with the local process backend, and with the agent backend
  reaching a real criv-agent (host mode, busybox container under crun) as pods do;
* the real daemon (`criv serve`, root only): a host-mode, hostNetwork busybox pod pulled
  from a loopback registry, URLs from the CRI Exec RPC, so the figure includes the CRI
  call, the sandbox lookup and StartExec;
* containerd 1.6's CRI streaming server (Debian's containerd + runc), started with a
  private root, state and socket, driven through the CRI Exec RPC with criv's
  generated stubs, in a host-network pod made from a local busybox image.

Round trip: issue the URL, upgrade, open streams, run `true`, read the Success status.
Throughput: `head -c N /dev/zero` through stdout. Prints figures; never pass/fail.
Needs root for containerd; the containerd part is skipped (with the reason) if it
cannot start. Usage: .venv/bin/python bench/stream.py [--iterations 50] [--mib 512]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.spdy_client import spdy_exec  # noqa: E402

IssueUrl = Callable[[list[str]], Awaitable[str]]


# --- criv, in a child process that issues URLs on request ---


class _HarnessLink:
    """The agent link the daemon provides, against one test-harness agent."""

    def __init__(self, agent: Any) -> None:
        import grpc

        from criv_agent.api.agent.v1 import agent_pb2_grpc

        self.agent = agent
        self.stub = agent_pb2_grpc.AgentStub(grpc.aio.insecure_channel(f"unix:{agent.control}"))

    async def start_exec(
        self, container_id: str, cmd: list[str], tty: bool, stdin: bool
    ) -> tuple[str, str]:
        from criv_agent.api.agent.v1 import agent_pb2

        req = agent_pb2.StartExecRequest(container_id=container_id, cmd=cmd, tty=tty, stdin=stdin)
        resp = await self.stub.StartExec(req, timeout=10)
        return str(self.agent.sandbox_id), str(resp.exec_id)

    async def open_data_stream(
        self, sandbox_id: str, params: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        from criv.agent.logstream import open_stream
        from criv_agent.api.agent.v1 import agent_pb2

        kinds = {
            "stdio": agent_pb2.StreamOpen.STDIO,
            "port_forward": agent_pb2.StreamOpen.PORT_FORWARD,
        }
        req = agent_pb2.StreamOpen(
            kind=kinds[params.kind], container_id=params.container_id, exec_id=params.exec_id
        )
        return await open_stream(self.agent.data, req)


async def serve_child(mode: str) -> None:
    """Child mode: read one JSON argv per stdin line, answer with an exec URL.

    ``local``: the local process backend. ``agent``: a real criv-agent (host mode) with a
    busybox container, reached through StartExec and STDIO data streams, as pods are.
    """
    from criv.config import StreamingConfig
    from criv.streaming.agent_backend import AgentStreamingBackend
    from criv.streaming.local import LocalProcessBackend
    from criv.streaming.server import StreamingServer
    from criv.streaming.service import StreamingService

    backend: Any
    agent: Any = None
    workdir = Path(tempfile.mkdtemp(prefix="criv-bench-agent-"))
    if mode == "agent":
        from tests.support.agent_harness import Agent, build_rootfs

        agent = Agent(workdir / "work", build_rootfs(workdir / "rootfs"))
        (workdir / "work").mkdir()
        agent.start()
        agent.setup()
        agent.create("bench", ["sleep", "1000000"])
        agent.start_c("bench")
        backend = AgentStreamingBackend(_HarnessLink(agent))
    else:
        backend = LocalProcessBackend()
    server = StreamingServer(StreamingConfig(), backend)
    await server.start()
    service = StreamingService(server)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        while line := await reader.readline():
            url = service.exec_url("bench", json.loads(line), stderr=False)
            sys.stdout.write(url + "\n")
            sys.stdout.flush()
    finally:
        await server.stop()
        if agent is not None:
            agent.shutdown()
        elif isinstance(backend, LocalProcessBackend):
            await backend.close()
        shutil.rmtree(workdir, ignore_errors=True)


class CrivChild:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve-child",
            self.mode,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"criv child ({self.mode}) did not start")

    async def issue(self, cmd: list[str]) -> str:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.proc.stdin.drain()
        return (await self.proc.stdout.readline()).decode().strip()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
            await self.proc.wait()


# --- the real daemon ---


class CrivDaemon:
    """`criv serve` with a host-mode hostNetwork pod (no CNI needed), driven over CRI."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="criv-bench-daemon-"))
        self.registry: Any = None
        self.proc: Any = None
        self.rt: Any = None
        self.sandbox_id = ""
        self.container_id = ""

    async def start(self) -> None:
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        from criv_agent.api.runtime.v1 import api_pb2
        from tests.support.daemon import CrivProcess, default_config, merge
        from tests.support.fixtures import TestRegistry

        self.registry = TestRegistry(self.dir / "registry")
        self.registry.start()
        self.registry.push_busybox()
        image = self.registry.busybox_ref
        root = self.dir / "criv"
        root.mkdir()
        cfg = merge(default_config(root), {"registries": {"insecure": [self.registry.host]}})
        cfg["log"]["level"] = "info"
        self.proc = CrivProcess(root, cfg)
        self.proc.start()
        self.rt = self.proc.runtime
        self.proc.images.PullImage(
            api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120
        )
        pod = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name="bench", namespace="default", uid="b"),
            log_directory=str(self.dir / "logs"),
            linux=api_pb2.LinuxPodSandboxConfig(
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE)
                )
            ),
        )
        req = api_pb2.RunPodSandboxRequest(config=pod)
        self.sandbox_id = self.rt.RunPodSandbox(req, timeout=60).pod_sandbox_id
        ctr = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="c"),
            image=api_pb2.ImageSpec(image=image),
            command=["sleep", "1000000"],
            log_path="c.log",
        )
        create = api_pb2.CreateContainerRequest(
            pod_sandbox_id=self.sandbox_id, config=ctr, sandbox_config=pod
        )
        self.container_id = self.rt.CreateContainer(create, timeout=60).container_id
        self.rt.StartContainer(
            api_pb2.StartContainerRequest(container_id=self.container_id), timeout=60
        )

    async def issue(self, cmd: list[str]) -> str:
        from criv_agent.api.runtime.v1 import api_pb2

        req = api_pb2.ExecRequest(container_id=self.container_id, cmd=cmd, stdout=True)
        resp = await asyncio.to_thread(self.rt.Exec, req, timeout=10)
        return str(resp.url)

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        from criv_agent.api.runtime.v1 import api_pb2

        try:
            if self.sandbox_id:
                sid = self.sandbox_id
                self.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid))
                self.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid))
        finally:
            if self.proc is not None:
                self.proc.stop()
            if self.registry is not None:
                self.registry.close()
            shutil.rmtree(self.dir, ignore_errors=True)


# --- containerd ---


def build_busybox_oci(dest: Path, name: str) -> Path:
    """An OCI image-layout tar with busybox-static as /bin/*; no registry needed."""
    import hashlib
    import io
    import tarfile

    def blob(layout: tarfile.TarFile, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        info = tarfile.TarInfo(f"blobs/sha256/{digest}")
        info.size = len(data)
        layout.addfile(info, io.BytesIO(data))
        return f"sha256:{digest}"

    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer:
        for d in ("bin", "tmp", "proc", "dev", "sys", "etc"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            layer.addfile(info)
        data = Path("/bin/busybox").read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        layer.addfile(info, io.BytesIO(data))
        for applet in ("sh", "sleep", "head", "cat", "true", "echo"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            layer.addfile(info)
    layer_bytes = layer_buf.getvalue()
    tar_path = dest / "busybox-oci.tar"
    with tarfile.open(tar_path, "w") as layout:
        layer_digest = blob(layout, layer_bytes)
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["sleep", "1000000"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
        config_bytes = json.dumps(config).encode()
        config_digest = blob(layout, config_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config_bytes),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": len(layer_bytes),
                }
            ],
        }
        manifest_bytes = json.dumps(manifest).encode()
        manifest_digest = blob(layout, manifest_bytes)
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": len(manifest_bytes),
                    "annotations": {"io.containerd.image.name": name},
                }
            ],
        }
        for fname, content in (
            ("index.json", json.dumps(index).encode()),
            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        ):
            info = tarfile.TarInfo(fname)
            info.size = len(content)
            layout.addfile(info, io.BytesIO(content))
    return tar_path


class Containerd:
    IMAGE = "docker.io/criv-bench/busybox:1"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="criv-bench-ctrd-"))
        self.sock = self.dir / "containerd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: object = None
        self.sandbox_id = ""
        self.container_id = ""

    def _config(self, snapshotter: str) -> str:
        cni = self.dir / "cni"
        cni.mkdir(exist_ok=True)
        return f"""version = 2
root = "{self.dir}/root"
state = "{self.dir}/state"
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # Where criv's CI runs, root lacks CAP_SYS_RESOURCE: the pause container's -998
  # oom_score_adj would be refused; clamp it to ours instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"""

    async def start(self) -> None:
        import grpc

        from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc

        snapshotter = "overlayfs"
        (self.dir / "config.toml").write_text(self._config(snapshotter))
        log = (self.dir / "containerd.log").open("wb")
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(self.dir / "config.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for _ in range(100):
            if self.sock.exists():
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("containerd did not create its socket")
        tar = build_busybox_oci(self.dir, self.IMAGE)
        subprocess.run(
            ["ctr", "-a", str(self.sock), "-n", "k8s.io", "images", "import", str(tar)],
            check=True,
            capture_output=True,
        )
        self.channel = grpc.aio.insecure_channel(f"unix:{self.sock}")
        rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.rt = rt
        meta = api_pb2.PodSandboxMetadata(name="bench", namespace="default", uid="bench-uid")
        pod = api_pb2.PodSandboxConfig(
            metadata=meta,
            log_directory=str(self.dir / "logs"),
            linux=api_pb2.LinuxPodSandboxConfig(
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE)
                )
            ),
        )
        self.sandbox_id = (
            await rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod))
        ).pod_sandbox_id
        ctr = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="c"),
            image=api_pb2.ImageSpec(image=self.IMAGE),
            command=["sleep", "1000000"],
            log_path="c.log",
        )
        self.container_id = (
            await rt.CreateContainer(
                api_pb2.CreateContainerRequest(
                    pod_sandbox_id=self.sandbox_id, config=ctr, sandbox_config=pod
                )
            )
        ).container_id
        await rt.StartContainer(api_pb2.StartContainerRequest(container_id=self.container_id))

    async def issue(self, cmd: list[str]) -> str:
        from criv_agent.api.runtime.v1 import api_pb2

        resp = await self.rt.Exec(
            api_pb2.ExecRequest(container_id=self.container_id, cmd=cmd, stdout=True)
        )
        return str(resp.url)

    async def stop(self) -> None:
        from criv_agent.api.runtime.v1 import api_pb2

        with contextlib.suppress(Exception):
            if self.sandbox_id:
                await self.rt.StopPodSandbox(
                    api_pb2.StopPodSandboxRequest(pod_sandbox_id=self.sandbox_id)
                )
                await self.rt.RemovePodSandbox(
                    api_pb2.RemovePodSandboxRequest(pod_sandbox_id=self.sandbox_id)
                )
        if self.channel is not None:
            await self.channel.close()  # type: ignore[attr-defined]
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Anything containerd left mounted under its private root goes, then the dir.
        mounts = [
            line.split()[1]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(self.dir))
        ]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- measurements ---


async def round_trips(issue: IssueUrl, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await spdy_exec(await issue(["true"]), stderr=False)
        out.append(time.perf_counter() - t0)
        assert r.status.get("status") == "Success", r.error
    return out


async def throughput(issue: IssueUrl, mib: int) -> float:
    t0 = time.perf_counter()
    r = await spdy_exec(await issue(["head", "-c", str(mib << 20), "/dev/zero"]), stderr=False)
    elapsed = time.perf_counter() - t0
    assert len(r.stdout) == mib << 20, len(r.stdout)
    return mib / elapsed


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def measure(name: str, issue: IssueUrl, iterations: int, mib: int) -> None:
    await round_trips(issue, 3)  # warm up
    rtts = await round_trips(issue, iterations)
    tput = statistics.median([await throughput(issue, mib) for _ in range(3)])
    print(
        f"{name:<34} exec round trip p50 {pct(rtts, 50) * 1e3:7.2f} ms  "
        f"p90 {pct(rtts, 90) * 1e3:7.2f} ms   stdout {tput:8.1f} MiB/s"
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--serve-child", choices=["local", "agent"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_child:
        await serve_child(args.serve_child)
        return
    print(f"exec round trips: {args.iterations}; throughput: {args.mib} MiB, median of 3")
    for mode, name in (
        ("local", "criv (SPDY, local backend)"),
        ("agent", "criv (SPDY, agent, host mode)"),
    ):
        criv = CrivChild(mode)
        try:
            await criv.start()
            await measure(name, criv.issue, args.iterations, args.mib)
        except Exception as e:
            print(f"{name}: could not measure: {e!r}")
        finally:
            await criv.stop()
    if os.geteuid() != 0:
        print("criv daemon: skipped (needs root)")
    else:
        daemon = CrivDaemon()
        name = "criv daemon (SPDY, CRI Exec, host)"
        try:
            await daemon.start()
            await measure(name, daemon.issue, args.iterations, args.mib)
        except Exception as e:
            print(f"{name}: could not measure: {e!r}\n{daemon.proc.logs() if daemon.proc else ''}")
        finally:
            await daemon.stop()
    if os.geteuid() != 0 or shutil.which("containerd") is None:
        print("containerd: skipped (needs root and Debian's containerd)")
        return
    ctrd = Containerd()
    try:
        await ctrd.start()
        await measure("containerd 1.6 (SPDY, runc)", ctrd.issue, args.iterations, args.mib)
    except Exception as e:
        log = ctrd.dir / "containerd.log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        print(f"containerd: could not measure: {e!r}\n{tail}")
    finally:
        await ctrd.stop()


if __name__ == "__main__":
    asyncio.run(main())
