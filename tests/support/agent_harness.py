"""Running a real criv-agent on the host for tests: a busybox rootfs, the agent process,
a gRPC stub, CRI-shaped request builders, the LOG data stream, and teardown checks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from criv_agent.api.agent.v1 import agent_pb2, agent_pb2_grpc
from criv_agent.api.runtime.v1 import api_pb2

BUSYBOX = "/bin/busybox"
CRUN = "/usr/bin/crun"
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n" \
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"  # fmt: skip
NsMode: TypeAlias = api_pb2.NamespaceMode.ValueType
GROUP = "root:x:0:\napp:x:1000:\nextra:x:2000:app\nnogroup:x:65534:\n"


def build_rootfs(dest: Path) -> Path:
    """A minimal rootfs: static busybox, its applets as relative symlinks, passwd/group."""
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    for name in applets.stdout.split():
        if name != "busybox":
            (dest / "bin" / name).symlink_to("busybox")
    for d in ("etc", "proc", "sys", "dev", "root", "home/app", "tmp", "var", "run"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    os.chown(dest / "home/app", 1000, 1000)
    (dest / "etc/passwd").write_text(PASSWD)
    (dest / "etc/group").write_text(GROUP)
    return dest


def copy_rootfs(template: Path, dest: Path) -> Path:
    """A per-container rootfs; busybox is hard-linked (no container writes to it)."""
    shutil.copytree(template, dest, symlinks=True, copy_function=_link_or_copy)
    return dest


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_frame(sock: socket.socket) -> bytes:
    hdr = _recv_exact(sock, 4)
    (n,) = struct.unpack(">I", hdr)
    return _recv_exact(sock, n)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


class Agent:
    """One criv-agent subprocess serving one pod."""

    def __init__(self, workdir: Path, rootfs_template: Path) -> None:
        self.workdir = workdir
        self.template = rootfs_template
        # sun_path is 108 bytes: keep the sockets short
        self.sockdir = tempfile.mkdtemp(prefix="cra-", dir="/tmp")
        self.control = os.path.join(self.sockdir, "c.sock")
        self.data = os.path.join(self.sockdir, "d.sock")
        self.state_dir = workdir / "state"
        self.sandbox_id = "sb" + uuid.uuid4().hex[:12]
        self.sandbox_dir = workdir / "sandbox"
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.stub: Any = None
        self.stderr_path = workdir / "agent.stderr"

    def start(self) -> None:
        err = open(self.stderr_path, "ab")  # noqa: SIM115 (kept for the process lifetime)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "criv_agent.main", "--control", f"unix:{self.control}",
             "--data", f"unix:{self.data}", "--state-dir", str(self.state_dir),
             "--crun", CRUN, "--log-level", "debug"],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            start_new_session=True,  # as criv starts it: a process group of its own
        )  # fmt: skip
        err.close()
        # wait for the sockets first: a channel that fails its first connect backs off 1 s
        deadline = time.monotonic() + 15
        while not os.path.exists(self.data):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("agent did not start:\n" + self.stderr())
            time.sleep(0.005)
        self.channel = grpc.insecure_channel(f"unix:{self.control}")
        self.stub = agent_pb2_grpc.AgentStub(self.channel)
        self.stub.Health(agent_pb2.HealthRequest(), timeout=10, wait_for_ready=True)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop_process(self) -> None:
        """SIGTERM: the agent exits, containers (if any) keep running."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # --- requests ----------------------------------------------------------------------

    def sandbox_config(self, **ns: NsMode) -> api_pb2.PodSandboxConfig:
        cfg = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name="pod", namespace="t", uid=self.sandbox_id),
            hostname="podhost",
            dns_config=api_pb2.DNSConfig(servers=["10.0.0.10"], searches=["t.svc"]),
        )
        opts = cfg.linux.security_context.namespace_options
        opts.network = ns.get("network", api_pb2.NamespaceMode.NODE)
        opts.ipc = ns.get("ipc", api_pb2.NamespaceMode.POD)
        opts.pid = ns.get("pid", api_pb2.NamespaceMode.CONTAINER)
        return cfg

    def setup(
        self, config: api_pb2.PodSandboxConfig | None = None, **ns: NsMode
    ) -> api_pb2.PodSandboxConfig:
        cfg = config or self.sandbox_config(**ns)
        self.stub.SetupSandbox(
            agent_pb2.SetupSandboxRequest(
                sandbox_id=self.sandbox_id, config=cfg, sandbox_dir=str(self.sandbox_dir),
                pod_ips=["10.1.2.3"],
            ),
            timeout=20,
        )  # fmt: skip
        self.sb_config = cfg
        return cfg

    def create(
        self,
        cid: str,
        command: list[str],
        *,
        image: dict[str, Any] | None = None,
        config: api_pb2.ContainerConfig | None = None,
        mounts: list[tuple[str, str]] = (),  # type: ignore[assignment]
        rootfs: Path | None = None,
    ) -> agent_pb2.ContainerInfo:
        cfg = config or api_pb2.ContainerConfig()
        cfg.metadata.name = cfg.metadata.name or cid
        if command:
            cfg.command[:] = command
        if rootfs is None:
            rootfs = copy_rootfs(self.template, self.workdir / f"rootfs-{cid}")
        for dst, src in mounts:
            cfg.mounts.add(container_path=dst, host_path=src)
        req = agent_pb2.CreateContainerRequest(
            container_id=cid,
            sandbox_id=self.sandbox_id,
            config=cfg,
            sandbox_config=getattr(self, "sb_config", None) or self.sandbox_config(),
            image_config_json=json.dumps({"config": image or {}}).encode(),
            rootfs=str(rootfs),
            mounts=[agent_pb2.ResolvedMount(container_path=d, agent_path=s) for d, s in mounts],
        )
        info: agent_pb2.ContainerInfo = self.stub.CreateContainer(req, timeout=30).info
        return info

    def run(self, cid: str, command: list[str], **kw: Any) -> agent_pb2.ContainerInfo:
        """Create, start, wait; the exited container's info."""
        self.create(cid, command, **kw)
        self.start_c(cid)
        return self.wait(cid)

    def start_c(self, cid: str) -> agent_pb2.ContainerInfo:
        req = agent_pb2.ContainerRequest(container_id=cid)
        info: agent_pb2.ContainerInfo = self.stub.StartContainer(req, timeout=30).info
        return info

    def wait(self, cid: str, timeout: float = 30) -> agent_pb2.ContainerInfo:
        req = agent_pb2.ContainerRequest(container_id=cid)
        info: agent_pb2.ContainerInfo = self.stub.WaitContainer(req, timeout=timeout).info
        return info

    def status(self, cid: str) -> agent_pb2.ContainerInfo:
        req = agent_pb2.ContainerRequest(container_id=cid)
        info: agent_pb2.ContainerInfo = self.stub.ContainerStatus(req, timeout=10).info
        return info

    def exec(self, cid: str, cmd: list[str], timeout: int = 10, limit: int = 0) -> Any:
        req = agent_pb2.ExecSyncRequest(
            container_id=cid, cmd=cmd, timeout_seconds=timeout, output_limit=limit
        )
        return self.stub.ExecSync(req, timeout=timeout + 20)

    def remove(self, cid: str) -> None:
        self.stub.RemoveContainer(agent_pb2.ContainerRequest(container_id=cid), timeout=30)

    def log_stream(self, cid: str, offset: int = 0, timeout: float = 30) -> bytes:
        """The whole LOG stream: returns once the agent closed it."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.data)
            body = agent_pb2.StreamOpen(
                kind=agent_pb2.StreamOpen.LOG, container_id=cid, offset=offset
            ).SerializeToString()
            s.sendall(struct.pack(">I", len(body)) + body)
            acc = agent_pb2.StreamAccept.FromString(read_frame(s))
            if not acc.ok:
                raise RuntimeError(acc.error)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    def logs(self, cid: str) -> list[tuple[str, str, str]]:
        """(stream, tag, content) of every record."""
        out = []
        for line in self.log_stream(cid).decode().splitlines():
            ts, stream, tag, content = [*line.split(" ", 3), ""][:4]
            assert ts.endswith("Z") and "T" in ts, line
            out.append((stream, tag, content))
        return out

    # --- teardown ----------------------------------------------------------------------

    def shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.stub is not None:
            with contextlib.suppress(grpc.RpcError):
                self.stub.ShutdownSandbox(
                    agent_pb2.ShutdownSandboxRequest(timeout_seconds=1), timeout=60
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.stop_process()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def group_members(self) -> list[str]:
        """Processes still in the agent's process group (the holder lives there)."""
        if self.proc is None:
            return []
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if os.getpgid(int(d.name)) == self.proc.pid:
                        cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                        out.append(f"process {d.name}: {cmd}")
                except (OSError, ProcessLookupError):
                    continue
        return out

    def kill_group(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)

    def leftovers(self) -> list[str]:
        out = []
        root = self.state_dir / "crun"
        if root.exists():
            r = subprocess.run([CRUN, "--root", str(root), "list", "-q"],
                               capture_output=True, text=True)  # fmt: skip
            out += [f"crun container {c}" for c in r.stdout.split()]
        for ctrl in ("memory", "pids", "cpu", ""):
            d = Path("/sys/fs/cgroup", ctrl, "criv", self.sandbox_id)
            if d.exists():
                out.append(f"cgroup {d}")
        mounts = Path("/proc/self/mountinfo").read_text()
        if str(self.workdir) in mounts:
            out.append("mount under " + str(self.workdir))
        return out


@contextlib.contextmanager
def running_agent(workdir: Path, template: Path) -> Iterator[Agent]:
    agent = Agent(workdir, template)
    try:
        agent.start()
        yield agent
    finally:
        agent.shutdown()
        left = agent.leftovers() + agent.group_members()
        agent.kill_group()  # so that a failing test leaks nothing either
        assert not left, f"left behind: {left}\nagent log:\n{agent.stderr()[-4000:]}"
