"""Pod start benchmark: criv `vm` pods beside their floor and beside containerd + runc.

Measures, per run, through each runtime's CRI socket:

- ``ready``: RunPodSandbox until it returns (criv: the VM booted, the agent answered
  SetupSandbox, i.e. READY);
- ``pod+ctr``: RunPodSandbox + CreateContainer + StartContainer of a busybox ``sleep``
  (the pod and its first container running).

criv ``vm`` pods start as clones of their template (``vm.template: auto``): the first
pod boots cold and has the template built, the bench waits for it, then the measured runs
are clones. Beside them, in the same invocation:

- ``criv vm cold``: the same runs with ``vm.template: off`` (every pod booted);
- ``criv vm clone``: the same runs with ``vm.spare_vms: 0``: each pod's clone starts when
  the pod comes (the default keeps one loaded ahead, docs/vm.md, Spare VMs). Back to
  back, a pod may find its spare not yet made or not yet warmed up; ``--gap S`` waits S
  seconds before each vm pod (all three vm rows alike);

- ``qemu floor``: ``qemu-system-x86_64`` started directly (no libvirt, no CNI, no 9p) on the
  same kernel + initramfs with the same agent arguments and the vsock backend, until the
  agent answers Health: what a vm pod cannot beat without templating. One floor boot runs
  before each cold pod, so that the machine's slow spells hit both alike, and the cold
  pod's READY over the floor before it is printed pair by pair (the median of the ratios);
- ``criv host``: criv's host isolation (the agent without a VM);
- ``containerd``: Debian's containerd 1.6 + runc for the same pod (skipped if absent).

Then host memory per idle vm pod with 1 and 10 pods: its guest RAM (the pages allocated in
QEMU's guest RAM memfd, counted once: PSS alone misses a clone's pages loaded from its
template that nothing has mapped since), QEMU's own PSS without it, the helpers' (vsock
backend + virtiofsd) PSS without their guest RAM mappings, and criv's own growth, divided
by the pod count; spare VMs waiting beside them are printed apart. VMs boot
one after another (TCG on two cores). Figures only, never pass/fail. Needs root, libvirtd
and the guest image (`criv image build`). ``--compare-free-page-reporting`` measures the
PSS again with ``vm.free_page_reporting: false`` (the baseline), same run;
``--compare-initramfs-root`` the clones and PSS again with the guest root in the
initramfs (no root disk: as before the root moved to a read-only erofs disk);
``--compare-root-disk`` the same with ``vm.root_dax: false`` (the root on a read-only
virtio disk, copied into each VM's page cache, as before it was mapped with DAX);
``--compare-helper-aslr`` the same with ``vm.fixed_helper_layout: false`` (under TCG the
agent's helpers keep ASLR, so QEMU translates crun anew at every run). Usage:

    .venv/bin/python bench/podstart.py [--runs 10] [--skip-containerd] [--skip-pss]
        [--skip-host] [--pss-pods 10] [--max-vcpus N] [--compare-free-page-reporting]
        [--compare-initramfs-root] [--compare-root-disk] [--compare-helper-aslr] [--gap S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

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
    qemu_image_args,
    vm_memory_kib,
)

from criv.agent.client import AgentClient
from criv.guestimage import GuestImage, Inputs, build_guest_image
from criv.hypervisor.hostsetup import start_libvirtd
from criv.sandbox.vm.ready import http2_answers
from criv.vsock.process import VsockBackendProcess
from criv_agent.api.runtime.v1 import api_pb2

AGENT_ARGS = "criv.agent_args=--control,vsock:1024,--data,vsock:1025,--state-dir,/run/criv/agent"


def pod_start(r: Runtime, image: str, runs: int, logs: Path, gap: float = 0.0) -> Samples:
    """``runs`` pods one after another, each removed before the next; ``gap`` s of quiet
    before each (pods that do not come back to back)."""
    s: Samples = {}
    rt = r.rt
    for _ in range(runs):
        time.sleep(gap)
        cfg = r.pod_config(logs)
        t0 = time.perf_counter()
        pid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cfg), timeout=300).pod_sandbox_id
        s.setdefault("ready", []).append(time.perf_counter() - t0)
        ctr = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="c"),
            image=api_pb2.ImageSpec(image=image),
            command=["sleep", "1000000"],
        )
        req = api_pb2.CreateContainerRequest(pod_sandbox_id=pid, config=ctr, sandbox_config=cfg)
        cid = rt.CreateContainer(req, timeout=300).container_id
        rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=300)
        s.setdefault("pod+ctr", []).append(time.perf_counter() - t0)
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pid), timeout=300)
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pid), timeout=300)
    return s


def wait_template(root: Path, timeout: float = 600, known: frozenset[Path] = frozenset()) -> float:
    """Seconds until a template other than ``known`` is ready under ``root`` (criv builds
    it after a cold boot)."""
    t0 = time.monotonic()
    while not set(root.glob("[!.]*/meta.json")) - known:
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"no template in {root} after {timeout}s")
        time.sleep(0.2)
    return time.monotonic() - t0


def qemu_floor(img: GuestImage, d: Path) -> float:
    """Raw QEMU (the domain's devices minus NIC and 9p) to the agent's first Health
    answer, seconds; ``d`` is its own work directory."""
    d.mkdir(parents=True)
    backend = VsockBackendProcess(
        str(d / "v.sock"), str(d / "vs"), 3, listen_ports=[1024, 1025],
        log_path=str(d / "vsock.log"),
    )  # fmt: skip
    t0 = time.perf_counter()
    backend.start().wait_ready()
    argv = [
        "qemu-system-x86_64", "-M", "q35", "-cpu", "max",
        "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", f"file:{d / 'console.log'}",
        *qemu_image_args(img, f"console=ttyS0 quiet panic=-1 reboot=t {AGENT_ARGS}"),
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
        # one -accel: QEMU takes the first that works and ignores the rest, so a second
        # "-accel tcg,tb-size=64" after a plain one left the floor QEMU's default cache
        "-numa", "node,memdev=mem", "-accel", "tcg,tb-size=64",
        "-device", "virtio-rng-pci",
        "-chardev", f"socket,id=vs,path={d / 'v.sock'}",
        "-device", "vhost-user-vsock-pci,chardev=vs",
    ]  # fmt: skip
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        asyncio.run(_wait_health(f"unix:{d / 'vs'}.1024", t0))
        return time.perf_counter() - t0
    finally:
        qemu.kill()
        qemu.wait()
        backend.stop()


def cold_beside_floor(
    r: Runtime, img: GuestImage, image: str, args: argparse.Namespace, work: Path
) -> tuple[Samples, Samples, list[float]]:
    """Cold criv pods and raw QEMU floors in turn (floor, pod, floor, pod...), so that a
    slow spell of the machine hits both: (criv's samples, the floor's, each pair's ratio)."""
    cold: Samples = {}
    floor: Samples = {}
    ratios: list[float] = []
    for i in range(args.runs):
        f = qemu_floor(img, work / f"floor{i}")
        floor.setdefault("ready", []).append(f)
        one = pod_start(r, image, 1, work / "cold", args.gap)
        for k, xs in one.items():
            cold.setdefault(k, []).extend(xs)
        ratios.append(one["ready"][0] / f)
    return cold, floor, ratios


async def _wait_health(target: str, t0: float) -> None:
    """Polled as criv polls a booting pod (criv.sandbox.vm.ready): a bare HTTP/2 hello
    every 25 ms, then Health on a fresh channel, so that neither side of the comparison
    waits out a gRPC channel's reconnect backoff."""
    path = Path(target.removeprefix("unix:"))
    while True:
        if await http2_answers(path, 0.5):
            client = AgentClient(target)
            try:
                await client.health(timeout=2)
                return
            except Exception:
                pass
            finally:
                await client.close()
        if time.perf_counter() - t0 > 120:
            raise TimeoutError(f"no agent on {target}")
        await asyncio.sleep(0.025)


def vm_pss(r: Runtime, image: str, logs: Path, counts: list[int]) -> dict[int, dict[str, float]]:
    """Per idle pod (one sleeping container each): QEMU, backend and criv's growth, MiB."""
    assert r.proc is not None and r.proc.proc is not None
    criv_pid = r.proc.proc.pid
    out: dict[int, dict[str, float]] = {}
    pods: list[str] = []
    base = pss_kib(criv_pid)
    try:
        for n in counts:
            while len(pods) < n:
                cfg = r.pod_config(logs)
                pid = r.rt.RunPodSandbox(
                    api_pb2.RunPodSandboxRequest(config=cfg), timeout=300
                ).pod_sandbox_id
                ctr = api_pb2.ContainerConfig(
                    metadata=api_pb2.ContainerMetadata(name="idle"),
                    image=api_pb2.ImageSpec(image=image),
                    command=["sleep", "1000000"],
                )
                cid = r.rt.CreateContainer(
                    api_pb2.CreateContainerRequest(
                        pod_sandbox_id=pid, config=ctr, sandbox_config=cfg
                    ),
                    timeout=300,
                ).container_id
                r.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=300)
                pods.append(pid)
            time.sleep(5)  # idle: the guests settle
            guest = qemu = backend = 0
            domains = set()
            for pid in pods:
                resp = r.rt.PodSandboxStatus(
                    api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pid, verbose=True), timeout=30
                )
                iso = json.loads(resp.info["info"])["isolationState"]
                dom = iso["domain"]
                domains.add(dom)
                qpid = int(Path(f"/run/libvirt/qemu/{dom}.pid").read_text())
                m = vm_memory_kib(qpid, int(iso["backend_pid"]), int(iso.get("virtiofsd_pid", 0)))
                guest += m["guest RAM"]
                qemu += m["qemu anon"] + m["qemu file"]
                backend += m["backend"] + m["virtiofsd"]
            crivd = max(pss_kib(criv_pid) - base, 0)
            out[n] = {
                "guest": guest / n / 1024,
                "qemu": qemu / n / 1024,
                "backend": backend / n / 1024,
                "criv": crivd / n / 1024,
                "total": (guest + qemu + backend + crivd) / n / 1024,
            }
            print(f"  {n} pod(s): {out[n]['total']:.1f} MiB per pod", flush=True)
            # spares waiting for a pod (a pod that took one keeps its name)
            spares = [
                p for p in Path("/run/libvirt/qemu").glob("criv-spare-*.pid")
                if p.name[: -len(".pid")] not in domains
            ]  # fmt: skip
            if spares:
                kib = 0
                for p in spares:
                    kib += sum(vm_memory_kib(int(p.read_text())).values())
                out[n]["spares"] = len(spares)
                out[n]["spare_mib"] = kib / 1024
    finally:
        for pid in pods:
            r.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pid), timeout=300)
            r.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pid), timeout=300)
    return out


def print_breakdown(log: Path) -> None:
    """criv's per-step cold path lines (``cold path:``) from its log, the median of each
    step over the pods of this run."""
    steps: dict[str, list[float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        if "cold path:" not in line:
            continue
        for part in line.split("cold path:", 1)[1].split(","):
            name, _, secs = part.strip().rpartition(" ")
            with contextlib.suppress(ValueError):
                steps.setdefault(name, []).append(float(secs.rstrip("s")))
    if steps:
        print("\ncriv vm cold path, median per step (s; steps in [] ran in parallel):")
        for name, xs in steps.items():
            print(f"  {name:<28}{pct(xs, 0.5) / 1000:>8.3f}   ({len(xs)} pods)")


def report(results: dict[str, Samples], pss: dict[int, dict[str, float]]) -> None:
    print(f"\n{'runtime':<14}{'metric':<10}{'p50':>10}{'p90':>10}{'runs':>6}")
    print("-" * 50)
    for name, s in results.items():
        for metric, xs in s.items():
            print(f"{name:<14}{metric:<10}{pct(xs, 0.5):>8.0f}ms{pct(xs, 0.9):>8.0f}ms{len(xs):>6}")
    if pss:
        head = f"{'idle vm pods':<14}{'guest RAM':>10}{'qemu':>10}{'helpers':>10}{'criv':>10}"
        print(f"\n{head}{'total':>10}  MiB/pod")
        for n, m in pss.items():
            print(
                f"{n:<14}{m['guest']:>10.1f}{m['qemu']:>10.1f}{m['backend']:>10.1f}"
                f"{m['criv']:>10.1f}{m['total']:>10.1f}"
            )
            if m.get("spares"):
                print(f"{'':<14}+ {m['spares']:.0f} spare VM(s) waiting: {m['spare_mib']:.1f} MiB")


def variant_clones(
    env: BenchEnv, cfg: dict[str, Any], name: str, args: argparse.Namespace
) -> tuple[Samples, dict[int, dict[str, float]]]:
    """Clones (and the PSS of idle pods) under a variant of criv's config, in a criv of its
    own: its first pod boots cold and has the variant's template built."""
    templates = Path(cfg["vm"]["template_dir"])
    known = frozenset(templates.glob("[!.]*/meta.json"))
    with criv_runtime(env.root, env.registry, env.cni, cfg, name=f"criv-vm-{name}") as r:
        r.pull(env.image)
        pod_start(r, env.image, 1, env.logs / f"{name}-warm")
        print(f"{name}: template in {wait_template(templates, known=known):.1f}s", flush=True)
        print(f"criv vm, {name} (clones): {args.runs} runs...", flush=True)
        samples = pod_start(r, env.image, args.runs, env.logs / name, args.gap)
        pss = {} if args.skip_pss else vm_pss(r, env.image, env.logs / f"pss-{name}",
                                              [1, args.pss_pods])  # fmt: skip
    return samples, pss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--skip-containerd", action="store_true")
    ap.add_argument("--skip-pss", action="store_true")
    ap.add_argument("--skip-host", action="store_true")
    ap.add_argument("--pss-pods", type=int, default=10)
    # seconds of quiet before each criv vm pod: a spare VM is made once pods stop coming
    # for 3 s and warms up 2-3 s after (docs/vm.md, Spare VMs); 0: back to back
    ap.add_argument("--gap", type=float, default=0.0)
    # 1: no hot-pluggable vCPU slot (as before UpdatePodSandboxResources could add vCPUs)
    ap.add_argument("--max-vcpus", type=int, default=0, help="vm.max_vcpus (0: criv's default)")
    # the same PSS measurement again with vm.free_page_reporting off: what reporting saves
    ap.add_argument("--compare-free-page-reporting", action="store_true")
    # clones and PSS again with the guest root in the initramfs (no root disk)
    ap.add_argument("--compare-initramfs-root", action="store_true")
    # clones and PSS again with vm.root_dax off (the root on a read-only virtio disk)
    ap.add_argument("--compare-root-disk", action="store_true")
    # clones and PSS again with vm.fixed_helper_layout off (the agent's helpers keep ASLR)
    ap.add_argument("--compare-helper-aslr", action="store_true")
    args = ap.parse_args()
    start_libvirtd()
    img = build_guest_image(progress=lambda line: print(f"[guest-image] {line}", flush=True))
    results: dict[str, Samples] = {}
    pss: dict[int, dict[str, float]] = {}
    pss_off: dict[int, dict[str, float]] = {}
    pss_cold: dict[int, dict[str, float]] = {}
    cold_ratios: list[float] = []
    # clones under a variant of the config, each a baseline of the same run:
    # (name, what the variant is, its vm.* overrides) and the idle pods' PSS by name
    variants: list[tuple[str, str, dict[str, Any]]] = []
    pss_variant: dict[str, dict[int, dict[str, float]]] = {}
    vm_cfg = {
        "vm": {**image_config(img), "max_vcpus": args.max_vcpus},
        "runtime": {"handlers": {"": "vm", "vm": "vm", "host": "host"}},
    }
    with bench_env("criv-bench-ps-") as env:
        reg, image, cni, logs = env.registry, env.image, env.cni, env.logs
        templates = env.root / "templates"
        vm_cfg["vm"]["template_dir"] = str(templates)
        with criv_runtime(env.root, reg, cni, vm_cfg, name="criv-vm") as r:
            r.pull(image)
            # the first pod after criv starts: the start-up probes (KVM, libvirt's QEMU
            # capabilities) run in the background and must not show here
            print("criv vm: first pod...", flush=True)
            results["criv vm 1st"] = pod_start(r, image, 1, logs / "warm")
            # it booted cold and had its template built in the background (vm.template:
            # auto): the pods after it are clones
            print(f"criv vm: template built in {wait_template(templates):.1f}s", flush=True)
            print(f"criv vm (clones): {args.runs} runs...", flush=True)
            results["criv vm"] = pod_start(r, image, args.runs, logs / "vm", args.gap)
            if not args.skip_pss:
                print("criv vm: PSS of idle pods...", flush=True)
                pss = vm_pss(r, image, logs / "pss", [1, args.pss_pods])
            if r.proc is not None:
                print_breakdown(r.proc.log_path)
        # the baseline of spare VMs, same run: each clone started when its pod comes
        no_spare = {**vm_cfg, "vm": {**vm_cfg["vm"], "spare_vms": 0}}
        with criv_runtime(env.root, reg, cni, no_spare, name="criv-vm-nospare") as r:
            r.pull(image)
            print(f"criv vm, vm.spare_vms 0 (clones): {args.runs} runs...", flush=True)
            results["criv vm clone"] = pod_start(r, image, args.runs, logs / "nospare", args.gap)
            if r.proc is not None:
                print_breakdown(r.proc.log_path)
        # the baseline, same run: every pod booted cold
        cold = {**vm_cfg, "vm": {**vm_cfg["vm"], "template": "off"}}
        with criv_runtime(env.root, reg, cni, cold, name="criv-vm-cold") as r:
            r.pull(image)
            print(f"criv vm, vm.template off (cold), each after a qemu floor: {args.runs} runs...",
                  flush=True)  # fmt: skip
            results["criv vm cold"], results["qemu floor"], cold_ratios = cold_beside_floor(
                r, img, image, args, env.root / "cold"
            )
            if not args.skip_pss:
                print("criv vm, vm.template off (cold): PSS of idle pods...", flush=True)
                pss_cold = vm_pss(r, image, logs / "pss-cold", [1, args.pss_pods])
        if args.compare_free_page_reporting:
            off = {**vm_cfg, "vm": {**vm_cfg["vm"], "free_page_reporting": False}}
            with criv_runtime(env.root, reg, cni, off, name="criv-vm-nofpr") as r:
                r.pull(image)
                print("criv vm, free page reporting off: PSS of idle pods...", flush=True)
                pss_off = vm_pss(r, image, logs / "pss-off", [1, args.pss_pods])
        if args.compare_initramfs_root:
            ram_img = build_guest_image(inputs=replace(Inputs.default(), root="initramfs"))
            variants.append(("ramroot", "the guest root in the initramfs", image_config(ram_img)))
        if args.compare_root_disk:
            what = "vm.root_dax: false (the root on a read-only virtio disk)"
            variants.append(("rootdisk", what, {"root_dax": False}))
        if args.compare_helper_aslr:
            what = "vm.fixed_helper_layout: false (helpers keep ASLR)"
            variants.append(("aslr", what, {"fixed_helper_layout": False}))
        for name, _, overrides in variants:
            cfg = {**vm_cfg, "vm": {**vm_cfg["vm"], **overrides}}
            results[f"criv {name}"], pss_variant[name] = variant_clones(env, cfg, name, args)
        host_cfg = {"runtime": {"handlers": {"": "host", "host": "host"}}}
        if not args.skip_host:
            with criv_runtime(env.root, reg, cni, host_cfg, name="criv-host") as r:
                r.pull(image)
                print(f"criv host: {args.runs} runs...", flush=True)
                results["criv host"] = pod_start(r, image, args.runs, logs / "host")
        if not args.skip_containerd:
            ctrd = containerd_samples(
                env, f"{args.runs} runs", lambda r: pod_start(r, image, args.runs, logs / "ctrd")
            )
            if ctrd:
                results["containerd"] = ctrd
    report(results, pss)
    if cold_ratios:
        xs = sorted(cold_ratios)
        print(
            f"\ncold READY / qemu floor, pair by pair: median {statistics.median(xs):.2f}x "
            f"(range {xs[0]:.2f}-{xs[-1]:.2f}x, {len(xs)} pairs)"
        )
    if pss_cold:
        print("\nsame, vm.template: off (every pod booted cold; the baseline, same run):")
        report({}, pss_cold)
    for name, what, _ in variants:
        if pss_variant[name]:
            print(f"\nsame, {what} (the baseline, same run):")
            report({}, pss_variant[name])
    if pss_off:
        print("\nsame, vm.free_page_reporting: false (the baseline, same run):")
        report({}, pss_off)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
