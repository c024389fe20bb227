"""Density benchmark: how many idle criv `vm` pods this host holds, what each costs, and
whether CRI calls stay fast with all of them, beside containerd + runc with as many pods.

Starts idle vm pods (one busybox ``sleep`` container each) one after another until the
next would push the host's MemAvailable under 10% of its memory (judged from what the
last pod took) or ``--max`` pods (default 150) run. Prints:

- host memory per pod at 1, 10, 50 and N pods: the guest's RAM (the pages allocated in
  QEMU's memfd, counted once: PSS misses a clone's pages loaded from its template that no
  process has mapped since), QEMU's anonymous memory (TCG's translation cache, its heap)
  and file-backed pages (the kernel, initramfs, the guest root image that every guest
  maps with DAX, and QEMU's own binary: shared between pods, each pod's PSS a share of
  them; with ``vm.root_dax: false`` the root is read into guest RAM instead), the vsock
  backend and virtiofsd without their guest RAM mappings (PSS), and criv's own growth,
  divided by the pods;
- the time to READY (RunPodSandbox) of the last pod started;
- that every pod answers ExecSync;
- CRI ``Status``/``ListPodSandbox``/``ListContainers`` latency p50/p99 with N pods, beside
  containerd holding N runc pods at the same time and the Python gRPC floor (grpcfloor.py:
  criv's server stack answering empty replies): calls to all three are interleaved while
  criv's guests run, so all see the same load (containerd skipped if absent).

All pods are removed at the end. Figures only, never pass/fail. Needs root, libvirtd and
the guest image. Usage:

    .venv/bin/python bench/density.py [--max 150] [--calls 100] [--skip-containerd]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BenchEnv,
    Runtime,
    Samples,
    bench_env,
    containerd_samples,
    criv_runtime,
    image_config,
    pct,
    pss_kib,
    vm_memory_kib,
)
from grpcfloor import floor_runtime

from criv.guestimage import build_guest_image
from criv.hypervisor.hostsetup import start_libvirtd
from criv_agent.api.runtime.v1 import api_pb2

FLOOR = 0.10  # of MemTotal: stop before MemAvailable would fall under it
CHECKPOINTS = (1, 10, 50)
PARTS = ("guest RAM", "qemu anon", "qemu file", "backend", "virtiofsd", "criv", "total")


@dataclass
class VmFill:
    n: int
    pss: dict[int, dict[str, float]]  # pods -> part -> MiB per pod
    ready: dict[int, float]  # pod number -> seconds to READY
    answered: int  # pods whose container answered ExecSync


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, v = line.split(":", 1)
        out[k] = int(v.split()[0])  # KiB
    return out


def start_pod(r: Runtime, image: str, logs: Path) -> tuple[str, str, float]:
    """(pod id, container id, seconds RunPodSandbox took)."""
    cfg = r.pod_config(logs)
    t0 = time.perf_counter()
    pid = r.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cfg), timeout=300).pod_sandbox_id
    ready = time.perf_counter() - t0
    ctr = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="idle"),
        image=api_pb2.ImageSpec(image=image),
        command=["sleep", "1000000"],
    )
    req = api_pb2.CreateContainerRequest(pod_sandbox_id=pid, config=ctr, sandbox_config=cfg)
    cid = r.rt.CreateContainer(req, timeout=300).container_id
    r.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=300)
    return pid, cid, ready


def remove_all(r: Runtime, pods: list[str]) -> None:
    for pid in pods:
        try:
            r.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pid), timeout=300)
            r.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pid), timeout=300)
        except Exception as e:  # keep removing the others
            print(f"  removing {pid[:12]}: {e}", flush=True)


def vm_pss(r: Runtime, pods: list[str], criv_base: int) -> dict[str, float]:
    """MiB per pod, by part."""
    kib = dict.fromkeys(PARTS, 0)
    for pid in pods:
        resp = r.rt.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pid, verbose=True), timeout=30
        )
        iso = json.loads(resp.info["info"])["isolationState"]
        qemu = int(Path(f"/run/libvirt/qemu/{iso['domain']}.pid").read_text())
        m = vm_memory_kib(qemu, int(iso["backend_pid"]), int(iso.get("virtiofsd_pid", 0)))
        for k, v in m.items():
            kib[k] += v
    assert r.proc is not None and r.proc.proc is not None
    kib["criv"] = max(pss_kib(r.proc.proc.pid) - criv_base, 0)
    kib["total"] = sum(v for k, v in kib.items() if k != "total")
    return {k: v / len(pods) / 1024 for k, v in kib.items()}


def exec_all(r: Runtime, ctrs: list[str]) -> int:
    """How many containers answer ExecSync ``echo ok``."""
    ok = 0
    for cid in ctrs:
        try:
            req = api_pb2.ExecSyncRequest(container_id=cid, cmd=["echo", "ok"], timeout=60)
            resp = r.rt.ExecSync(req, timeout=90)
            ok += resp.exit_code == 0 and resp.stdout.strip() == b"ok"
        except Exception as e:
            print(f"  ExecSync {cid[:12]}: {e}", flush=True)
    return ok


def _cri_calls(r: Runtime) -> dict[str, Callable[[], object]]:
    return {
        "Status": lambda: r.rt.Status(api_pb2.StatusRequest(), timeout=30),
        "ListPodSandbox": lambda: r.rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30),
        "ListContainers": lambda: r.rt.ListContainers(api_pb2.ListContainersRequest(), timeout=30),
    }


def cri_latency(runtimes: list[Runtime], calls: int) -> dict[str, Samples]:
    """Each runtime's samples by method. Calls are interleaved (every method of every
    runtime in turn): a slow period, such as the guests' timer ticks, hits them alike."""
    s: dict[str, Samples] = {r.name: {} for r in runtimes}
    ops = {r.name: _cri_calls(r) for r in runtimes}
    for _ in range(calls):
        for name, calls_of in ops.items():
            for op, call in calls_of.items():
                t0 = time.perf_counter()
                call()
                s[name].setdefault(op, []).append(time.perf_counter() - t0)
    return s


def fill_vm(r: Runtime, image: str, logs: Path, cap: int, pods: list[str]) -> VmFill:
    """Start idle pods into ``pods`` (the caller removes them) until ``cap`` or memory."""
    assert r.proc is not None and r.proc.proc is not None
    criv_base = pss_kib(r.proc.proc.pid)
    total = meminfo()["MemTotal"]
    ctrs: list[str] = []
    pss: dict[int, dict[str, float]] = {}
    ready: dict[int, float] = {}
    stop_reason = f"--max {cap}"
    while len(pods) < cap:
        before = meminfo()["MemAvailable"]
        pid, cid, secs = start_pod(r, image, logs)
        pods.append(pid)
        ctrs.append(cid)
        n = len(pods)
        ready[n] = secs
        avail = meminfo()["MemAvailable"]
        print(f"  pod {n}: READY in {secs:.2f}s, MemAvailable {avail // 1024} MiB", flush=True)
        if n in CHECKPOINTS:
            time.sleep(3)  # idle: the guests settle
            pss[n] = vm_pss(r, pods, criv_base)
        if avail - max(before - avail, 0) < FLOOR * total:
            stop_reason = f"MemAvailable would fall under {FLOOR:.0%}"
            break
    n = len(pods)
    if n not in pss:
        time.sleep(3)
        pss[n] = vm_pss(r, pods, criv_base)
    print(f"criv vm: {n} pods ({stop_reason}); ExecSync in each...", flush=True)
    return VmFill(n, pss, ready, exec_all(r, ctrs))


def latency_beside_baselines(
    env: BenchEnv, criv: Runtime, n: int, calls: int, skip_containerd: bool
) -> dict[str, Samples]:
    """CRI latency by runtime name, measured together while criv's vm pods run: criv,
    containerd holding ``n`` runc pods (left out when skipped or not installed) and the
    Python gRPC floor (grpcfloor.py: criv's server stack answering empty replies)."""
    got: dict[str, Samples] = {}
    with floor_runtime(env.root) as floor:

        def measure(c: Runtime) -> Samples:
            pods: list[str] = []
            try:
                for _ in range(n):
                    pods.append(start_pod(c, env.image, env.logs / "ctrd")[0])
                print(
                    f"CRI latency: criv and containerd with {n} pods each, the floor...", flush=True
                )
                got.update(cri_latency([criv, c, floor], calls))
                return got[c.name]
            finally:
                remove_all(c, pods)

        if not skip_containerd:
            containerd_samples(env, f"{n} runc pods beside criv's", measure)
        if criv.name not in got:
            print(f"CRI latency: criv with {n} pods, the floor...", flush=True)
            got.update(cri_latency([criv, floor], calls))
    return got


def report(vm: VmFill, latency: dict[str, Samples], criv: str) -> None:
    n = vm.n
    print("\nhost memory per idle vm pod, PSS MiB (issue 14's target: total <= 64 with 20 pods)")
    print(f"{'pods':<6}{'READY s':>9}" + "".join(f"{p:>12}" for p in PARTS))
    for k, m in sorted(vm.pss.items()):
        print(f"{k:<6}{vm.ready[k]:>9.2f}" + "".join(f"{m[p]:>12.1f}" for p in PARTS))
    print(f"\nlast pod (#{n}) READY in {vm.ready[n]:.2f}s; ExecSync answered by {vm.answered}/{n}")
    names = [criv] + [k for k in latency if k != criv]
    print(f"\nCRI latency with {n} pods, p50 / p99 ms, all measured together:")
    print(f"{'':<16}" + "".join(f"{k:>16}" for k in names))
    for op in latency[criv]:
        cells = [f"{pct(latency[k][op], 0.5):.1f} / {pct(latency[k][op], 0.99):.1f}" for k in names]
        print(f"{op:<16}" + "".join(f"{c:>16}" for c in cells))
    print("(grpc floor: criv's server stack answering empty replies; containerd: runc pods)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max", type=int, default=150, help="most vm pods to start")
    ap.add_argument("--calls", type=int, default=100, help="calls per CRI method timed")
    ap.add_argument("--skip-containerd", action="store_true")
    args = ap.parse_args()
    start_libvirtd()
    img = build_guest_image(progress=lambda line: print(f"[guest-image] {line}", flush=True))
    vm_cfg = {
        "vm": image_config(img),
        "runtime": {"handlers": {"": "vm", "vm": "vm", "host": "host"}},
    }
    with (
        bench_env("criv-bench-dens-") as env,
        criv_runtime(env.root, env.registry, env.cni, vm_cfg, name="criv-vm") as r,
    ):
        r.pull(env.image)
        print(f"criv vm: idle pods, up to {args.max}...", flush=True)
        pods: list[str] = []
        try:
            vm = fill_vm(r, env.image, env.logs / "vm", args.max, pods)
            latency = latency_beside_baselines(env, r, vm.n, args.calls, args.skip_containerd)
        finally:
            print(f"criv vm: removing {len(pods)} pods...", flush=True)
            remove_all(r, pods)
    report(vm, latency, r.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
