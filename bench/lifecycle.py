"""Lifecycle benchmark: criv (`host` isolation) beside Debian's containerd 1.6, same run.

Measures, through each runtime's CRI socket with the same client code, the latency of:
pod RunPodSandbox / StopPodSandbox / RemovePodSandbox; container CreateContainer /
StartContainer / StopContainer / RemoveContainer (in one long-lived pod); and ExecSync
of `true`. Both runtimes use the same CNI conflist (criv's default, in a private conf
dir with its own IPAM dir) and the same busybox image from a loopback registry;
containerd gets a private root/state/socket, runc, the overlayfs snapshotter, and a
"pause" image built from busybox (`sleep 2147483647`) pushed to that registry.

Prints p50/p90 per operation (milliseconds) and the criv/containerd ratio. Figures
only, never pass/fail. Needs root. Usage:

    .venv/bin/python bench/lifecycle.py [--runs 20] [--skip-containerd]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc  # noqa: E402
from tests.support.daemon import CrivProcess, default_config, merge  # noqa: E402
from tests.support.images import busybox_image  # noqa: E402
from tests.support.registry import RegistryServer  # noqa: E402

# The bench's own bridge and subnet: it may run beside a criv using the default conflist.
BRIDGE = "crivbench0"
SUBNET = "10.212.0.0/16"
OPS = [
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ExecSync",
]
Samples = dict[str, list[float]]


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


def measure(r: Runtime, image: str, runs: int, logs: Path) -> Samples:
    s: Samples = {}
    rt = r.rt
    for _ in range(runs):
        cfg = r.pod_config(logs)
        pid = timed(s, "RunPodSandbox", lambda c=cfg: rt.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(config=c), timeout=120)).pod_sandbox_id  # fmt: skip
        stop = api_pb2.StopPodSandboxRequest(pod_sandbox_id=pid)
        timed(s, "StopPodSandbox", lambda q=stop: rt.StopPodSandbox(q, timeout=120))
        rm = api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pid)
        timed(s, "RemovePodSandbox", lambda q=rm: rt.RemovePodSandbox(q, timeout=120))

    cfg = r.pod_config(logs)
    pid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id
    try:
        for i in range(runs):
            ctr = api_pb2.ContainerConfig(
                metadata=api_pb2.ContainerMetadata(name=f"c{i}"),
                image=api_pb2.ImageSpec(image=image),
                command=["sleep", "1000000"],
                log_path=f"c{i}.log",
            )
            req = api_pb2.CreateContainerRequest(pod_sandbox_id=pid, config=ctr, sandbox_config=cfg)
            cid = timed(s, "CreateContainer", lambda q=req: rt.CreateContainer(
                q, timeout=120)).container_id  # fmt: skip
            start = api_pb2.StartContainerRequest(container_id=cid)
            timed(s, "StartContainer", lambda q=start: rt.StartContainer(q, timeout=120))
            if i == 0:  # ExecSync in the first container, before it stops
                ex = api_pb2.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=10)
                for _ in range(runs):
                    resp = timed(s, "ExecSync", lambda q=ex: rt.ExecSync(q, timeout=60))
                    assert resp.exit_code == 0, resp
            # timeout 0: SIGKILL at once in both runtimes (sleep as pid 1 ignores TERM)
            stop_c = api_pb2.StopContainerRequest(container_id=cid, timeout=0)
            timed(s, "StopContainer", lambda q=stop_c: rt.StopContainer(q, timeout=120))
            rm_c = api_pb2.RemoveContainerRequest(container_id=cid)
            timed(s, "RemoveContainer", lambda q=rm_c: rt.RemoveContainer(q, timeout=120))
    finally:
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pid), timeout=120)
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pid), timeout=120)
    return s


@contextlib.contextmanager
def criv_runtime(root: Path, reg: RegistryServer, cni: Path) -> Iterator[Runtime]:
    base = root / "criv"
    base.mkdir()
    cfg = merge(
        default_config(base),
        {
            "log": {"level": "info"},
            "registries": {"insecure": [reg.host]},
            "cni": {"conf_dir": str(cni), "bin_dirs": ["/usr/lib/cni"]},
        },
    )
    proc = CrivProcess(base, cfg)
    proc.start()
    r = Runtime(proc.socket)
    r.name = "criv"
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


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))] * 1000


def report(results: dict[str, Samples]) -> None:
    names = list(results)
    head = f"{'operation':<18}" + "".join(f"{n + ' p50':>16}{n + ' p90':>16}" for n in names)
    if len(names) == 2:
        head += f"{'ratio p50':>12}"
    print(head)
    print("-" * len(head))
    for op in OPS:
        row = f"{op:<18}"
        p50s = []
        for n in names:
            xs = results[n].get(op, [])
            if xs:
                p50s.append(pct(xs, 0.5))
                row += f"{pct(xs, 0.5):>14.1f}ms{pct(xs, 0.9):>14.1f}ms"
            else:
                p50s.append(float("nan"))
                row += f"{'-':>16}{'-':>16}"
        if len(names) == 2 and p50s[1]:
            row += f"{p50s[0] / p50s[1]:>11.2f}x"
        print(row)
    runs = {n: len(results[n].get("RunPodSandbox", [])) for n in names}
    print(f"\nruns per operation: {runs}; ratio = criv / containerd (lower is better for criv)")
    for n in names:
        total = sum(statistics.fmean(results[n][op]) for op in OPS[:3] if op in results[n])
        print(f"{n}: pod run+stop+remove mean {total * 1000:.1f}ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--skip-containerd", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="criv-bench-lc-"))
    made_bridge = (
        subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0
    )
    results: dict[str, Samples] = {}
    reg = RegistryServer(root / "registry")
    try:
        reg.start()
        reg.push_image("library/busybox", "latest", busybox_image())
        pause_img = busybox_image(config={"Cmd": ["sleep", "2147483647"]})
        reg.push_image("library/pause", "bench", pause_img)
        image, pause = reg.ref("library/busybox"), reg.ref("library/pause", "bench")
        cni = cni_dir(root / "cni")
        logs = root / "logs"
        with criv_runtime(root, reg, cni) as r:
            r.pull(image)
            print(f"criv: {args.runs} runs...", flush=True)
            results["criv"] = measure(r, image, args.runs, logs / "criv")
        if not args.skip_containerd:
            if shutil.which("containerd") is None:
                print("containerd not installed: skipped")
            else:
                with containerd_runtime(root, reg, cni, pause) as r:
                    r.pull(image)
                    r.pull(pause)
                    print(f"containerd: {args.runs} runs...", flush=True)
                    results["containerd"] = measure(r, image, args.runs, logs / "containerd")
    finally:
        reg.close()
        if made_bridge:
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    print()
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
