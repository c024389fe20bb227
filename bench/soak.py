"""Soak: many pod lifecycles through one criv, and what each leaves behind (issue 13).

Each cycle, through criv's CRI socket: RunPodSandbox, CreateContainer, StartContainer,
ExecSync (`echo`), StopPodSandbox, RemovePodSandbox. Before (after one warm-up cycle:
imports, the image, the bridge) and after the cycles it prints criv's open fds, threads
and RSS, the mounts under the bench's temp root, the host's network links and the IPAM
store's addresses, and the change. Figures only, never pass/fail; a change in anything
but RSS is a leak to chase (RSS may settle a little higher: Python's allocator keeps
freed arenas). Needs root (and libvirt for vm). Usage:

    .venv/bin/python bench/soak.py [--mode host|vm] [--cycles N]   # N: 200 host, 20 vm
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BenchEnv, Runtime, bench_env, criv_runtime, image_config

from criv.guestimage import build_guest_image
from criv.hypervisor.hostsetup import start_libvirtd
from criv_agent.api.runtime.v1 import api_pb2

DEFAULT_CYCLES = {"host": 200, "vm": 20}
IP_FILE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def figures(r: Runtime, env: BenchEnv) -> dict[str, int]:
    assert r.proc is not None and r.proc.proc is not None
    pid = r.proc.proc.pid
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    mounts = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(str(env.root))
    ]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
    ipam = env.cni.parent / "ipam"
    return {
        "criv fds": len(os.listdir(f"/proc/{pid}/fd")),
        "criv threads": int(status["Threads"]),
        "criv RSS (KiB)": int(status["VmRSS"].split()[0]),
        "mounts": len(mounts),
        "links": len(links.stdout.splitlines()),
        "IPAM addresses": sum(1 for p in ipam.rglob("*") if IP_FILE.match(p.name))
        if ipam.is_dir()
        else 0,
    }


def cycle(r: Runtime, image: str, handler: str, logs: Path) -> None:
    rt = r.rt
    cfg = r.pod_config(logs)
    pod = rt.RunPodSandbox(
        api_pb2.RunPodSandboxRequest(config=cfg, runtime_handler=handler), timeout=300
    ).pod_sandbox_id
    c = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="soak"),
        image=api_pb2.ImageSpec(image=image),
        command=["sleep", "100000"],
        log_path="soak.log",
    )
    cid = rt.CreateContainer(
        api_pb2.CreateContainerRequest(pod_sandbox_id=pod, config=c, sandbox_config=cfg),
        timeout=120,
    ).container_id
    rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=120)
    out = rt.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["echo", "soak"]), timeout=60)
    if out.stdout != b"soak\n":
        raise RuntimeError(f"exec gave {out.stdout!r} {out.stderr!r}")
    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=120)


def report(before: dict[str, int], after: dict[str, int], cycles: int, took: float) -> None:
    print(f"\n{cycles} cycles in {took:.0f} s ({took / cycles:.2f} s each)")
    print(f"{'':<16}{'before':>10}{'after':>10}{'change':>10}")
    for k, v in before.items():
        print(f"{k:<16}{v:>10}{after[k]:>10}{after[k] - v:>+10}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("host", "vm"), default="host")
    ap.add_argument("--cycles", type=int)
    args = ap.parse_args()
    cycles = args.cycles or DEFAULT_CYCLES[args.mode]
    cfg: dict[str, Any] = {"runtime": {"handlers": {"": args.mode, "host": "host"}}}
    if args.mode == "vm":
        start_libvirtd()
        img = build_guest_image(progress=lambda line: print(f"[guest-image] {line}", flush=True))
        cfg["vm"] = image_config(img)
        cfg["runtime"]["handlers"]["vm"] = "vm"
    with bench_env(f"criv-soak-{args.mode}-") as env:
        env.root.chmod(0o711)  # QEMU (unprivileged) reaches the pods' sockets under it
        with criv_runtime(env.root, env.registry, env.cni, cfg) as r:
            r.pull(env.image)
            cycle(r, env.image, args.mode, env.logs)  # warm-up
            before = figures(r, env)
            t0 = time.monotonic()
            for i in range(cycles):
                cycle(r, env.image, args.mode, env.logs)
                if (i + 1) % max(1, cycles // 10) == 0:
                    print(f"{i + 1}/{cycles} cycles, {time.monotonic() - t0:.0f} s", flush=True)
            took = time.monotonic() - t0
            time.sleep(1)  # let the last pod's processes finish exiting
            after = figures(r, env)
        report(before, after, cycles, took)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
