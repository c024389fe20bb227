"""Shared bench helpers: CNI conflist, a CRI endpoint wrapper, criv and a private
containerd 1.6 (runc, overlayfs, the same CNI and registry), a loopback registry holding
busybox and a busybox "pause" image, timing and percentiles. Used by lifecycle.py and
podstart.py; figures only, never pass/fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from criv.guestimage import GuestImage  # noqa: E402
from criv.hypervisor.spec import ROOT_DISK_CMDLINE, root_disk_qemu_args  # noqa: E402
from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc  # noqa: E402
from tests.support.daemon import CrivProcess, default_config, merge  # noqa: E402
from tests.support.images import busybox_image  # noqa: E402
from tests.support.registry import RegistryServer  # noqa: E402

# The benches' own bridge and subnet: they may run beside a criv using the default conflist.
BRIDGE = "crivbench0"
SUBNET = "10.212.0.0/16"
Samples = dict[str, list[float]]


def start_registry(root: Path) -> tuple[RegistryServer, str, str]:
    """A loopback registry with busybox and a busybox "pause" (for containerd)."""
    reg = RegistryServer(root / "registry")
    reg.start()
    reg.push_image("library/busybox", "latest", busybox_image())
    pause_img = busybox_image(config={"Cmd": ["sleep", "2147483647"]})
    reg.push_image("library/pause", "bench", pause_img)
    return reg, reg.ref("library/busybox"), reg.ref("library/pause", "bench")


def bridge_missing() -> bool:
    return subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0


def cni_dir(root: Path) -> Path:
    conf = json.loads((ROOT / "etc/cni/10-criv.conflist").read_text())
    conf["plugins"][0]["ipam"]["dataDir"] = str(root / "ipam")
    conf["plugins"][0]["bridge"] = BRIDGE
    conf["plugins"][0]["ipam"]["ranges"] = [[{"subnet": SUBNET}]]
    d = root / "net.d"
    d.mkdir(parents=True)
    (d / "10-criv.conflist").write_text(json.dumps(conf))
    return d


class Runtime:
    """A CRI endpoint under test, driven by the same code for both runtimes."""

    name = ""

    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(
            f"unix:{socket}", options=[("grpc.max_receive_message_length", 16 << 20)]
        )
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)
        self.n = 0
        self.proc: CrivProcess | None = None  # criv's process (None for containerd)

    def pull(self, ref: str) -> None:
        spec = api_pb2.ImageSpec(image=ref)
        self.images.PullImage(api_pb2.PullImageRequest(image=spec), timeout=300)

    def pod_config(self, logs: Path) -> api_pb2.PodSandboxConfig:
        self.n += 1
        name = f"bench-{self.name}-{self.n}"
        return api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(
                name=name, namespace="bench", uid=f"uid-{name}", attempt=0
            ),
            hostname=name,
            log_directory=str(logs / name),
        )

    def close(self) -> None:
        self.channel.close()


def timed(samples: Samples, op: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    samples.setdefault(op, []).append(time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def criv_runtime(
    root: Path,
    reg: RegistryServer,
    cni: Path,
    extra: dict[str, Any] | None = None,
    name: str = "criv",
) -> Iterator[Runtime]:
    base = root / name
    base.mkdir()
    cfg = merge(
        default_config(base),
        {
            "log": {"level": "info"},
            "registries": {"insecure": [reg.host]},
            "cni": {"conf_dir": str(cni), "bin_dirs": ["/usr/lib/cni"]},
        },
    )
    proc = CrivProcess(base, merge(cfg, extra or {}))
    proc.start()
    r = Runtime(proc.socket)
    r.name = name
    r.proc = proc
    try:
        yield r
    finally:
        r.close()
        proc.stop()


CONTAINERD_CONFIG = """version = 2
root = "{root}/root"
state = "{root}/state"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  enable_selinux = false
  # root here lacks CAP_SYS_RESOURCE: clamp the pause container's -998 oom_score_adj
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]
    endpoint = ["{url}"]
"""


@contextlib.contextmanager
def containerd_runtime(root: Path, reg: RegistryServer, cni: Path, pause: str) -> Iterator[Runtime]:
    base = root / "containerd"
    base.mkdir()
    sock = base / "containerd.sock"
    (base / "config.toml").write_text(
        CONTAINERD_CONFIG.format(
            root=base, sock=sock, pause=pause, cni=cni, host=reg.host, url=reg.url
        )
    )
    with (base / "containerd.log").open("wb") as log:
        proc = subprocess.Popen(
            ["containerd", "--config", str(base / "config.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "containerd did not start:\n" + (base / "containerd.log").read_text()[-3000:]
                )
            time.sleep(0.1)
        r = Runtime(sock)
        r.name = "containerd"
        try:
            yield r
        finally:
            r.close()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # shims outlive containerd: kill those serving our private state dir
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                with contextlib.suppress(OSError):
                    cmd = (p / "cmdline").read_bytes()
                    if b"containerd-shim" in cmd and str(sock).encode() in cmd:
                        subprocess.run(["kill", "-9", p.name], capture_output=True)
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(str(base))
        ]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)


def image_config(img: GuestImage) -> dict[str, str]:
    """criv's ``vm`` config keys that boot ``img`` (its root disk, if it has one)."""
    return {
        "kernel": str(img.kernel),
        "initrd": str(img.initrd),
        "root_disk": str(img.root_disk or ""),
    }


def qemu_image_args(img: GuestImage, append: str, memory_mib: int = 256) -> list[str]:
    """Raw QEMU's arguments that boot ``img`` with kernel command line ``append``, as a
    pod's domain does (its root image read-only on virtio-pmem) in a VM of ``memory_mib``."""
    args = ["-kernel", str(img.kernel), "-initrd", str(img.initrd)]
    if img.root_disk is not None:
        args += root_disk_qemu_args(img.root_disk, memory_mib)
        append += " " + ROOT_DISK_CMDLINE
    return [*args, "-append", append]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))] * 1000


@dataclass(frozen=True)
class BenchEnv:
    root: Path
    registry: RegistryServer
    image: str
    pause: str
    cni: Path
    logs: Path


@contextlib.contextmanager
def bench_env(prefix: str) -> Iterator[BenchEnv]:
    """A temp root with a loopback registry (busybox + pause) and the benches' CNI config;
    removes all of it, and the bench bridge if this run made it."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    # QEMU runs unprivileged (docs/security.md) and must reach the pods' vhost-user
    # sockets under criv's run dir here: others may traverse (not list) the root
    root.chmod(0o711)
    made_bridge = bridge_missing()
    reg, image, pause = start_registry(root)
    try:
        yield BenchEnv(root, reg, image, pause, cni_dir(root / "cni"), root / "logs")
    finally:
        reg.close()
        if made_bridge:
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def containerd_samples(env: BenchEnv, what: str, measure: Callable[[Runtime], Samples]) -> Samples:
    """``measure`` against a private containerd, or {} when containerd is not installed."""
    if shutil.which("containerd") is None:
        print("containerd not installed: skipped")
        return {}
    with containerd_runtime(env.root, env.registry, env.cni, env.pause) as r:
        r.pull(env.image)
        r.pull(env.pause)
        print(f"containerd: {what}...", flush=True)
        return measure(r)


# --- host memory of a VM ---------------------------------------------------------------


def rollup(pid: int) -> dict[str, int]:
    """smaps_rollup's Pss lines (KiB); {} when the process is gone or ``pid`` is 0."""
    out: dict[str, int] = {}
    if pid <= 0:
        return out
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss"):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    except (OSError, ValueError):
        return {}
    return out


def pss_kib(pid: int) -> int:
    return rollup(pid).get("Pss", 0)


def memfd_pss_kib(pid: int) -> int:
    """The part of ``pid``'s PSS in memfd mappings (a VM's guest RAM)."""
    total, in_memfd = 0, False
    if pid <= 0:
        return 0
    try:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
                in_memfd = len(head) >= 6 and head[5].startswith("/memfd:")
            elif in_memfd and line.startswith("Pss:"):
                total += int(head[1])
    except (OSError, ValueError):
        pass
    return total


def guest_ram_kib(qemu: int) -> int:
    """KiB allocated in QEMU's guest RAM memfd: every page the guest has, mapped by some
    process or not. A clone's pages loaded from its template are written through the fd,
    so until the guest touches one no process maps it and no PSS counts it."""
    kib = 0
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{qemu}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith("/memfd:"):
                    st = os.stat(fd)
                    if st.st_size >= 64 << 20:
                        kib += st.st_blocks // 2
    return kib


def vm_memory_kib(qemu: int, backend: int = 0, virtiofsd: int = 0) -> dict[str, int]:
    """One VM's host memory, KiB: its guest RAM (QEMU's memfd, counted once); QEMU's own
    anonymous (TCG's translation cache, heap) and file-backed PSS (kernel, initramfs, the
    DAX-mapped root image, QEMU's binary: shared between VMs); the vsock backend's and
    virtiofsd's PSS without their guest RAM mappings."""
    q = rollup(qemu)
    return {
        "guest RAM": guest_ram_kib(qemu),
        "qemu anon": q.get("Pss_Anon", 0),
        "qemu file": q.get("Pss_File", 0),
        "backend": max(pss_kib(backend) - memfd_pss_kib(backend), 0),
        "virtiofsd": max(pss_kib(virtiofsd) - memfd_pss_kib(virtiofsd), 0),
    }
