"""vm-image pod benchmark: a containerDisk booted as a criv pod beside a plain QEMU boot of
the same disk.

Measures, per run, through criv's CRI socket (the VM test disk, images/vm-test-disk/,
pushed to a loopback registry as a containerDisk and pulled once):

- ``started``: RunPodSandbox + CreateContainer + StartContainer returned (the domain runs;
  criv does not wait for the guest);
- ``banner``: until the pod IP's port 22 gives an SSH banner (polled from the host every
  25 ms beside the exec below): the boot, comparable with the QEMU floor;
- ``exec``: until the first ExecSync (``true``) answers: the boot, the host key pinned
  from the console, the SSH login and the command, as a kubelet exec probe sees it;
- ``stop``: StopContainer (the ACPI power button, a clean power-off);
- ``commit``: ``criv vm-image commit`` of the stopped container into a new image (the
  flatten and the store), when this criv has the command.

Beside them, in the same invocation:

- ``qemu floor``: ``qemu-system-x86_64`` started directly (no libvirt, no CNI; user
  networking) on an overlay of the same disk with a NoCloud seed, same accelerator (TCG),
  vCPUs and memory, until its forwarded SSH port gives a banner.

``--firmware uefi`` runs both on the test disk's UEFI variant (GPT, systemd-boot): criv
picks OVMF from its partition table, and the floor boots it with the same OVMF files.

Figures and ratios only, never pass/fail. Needs root and libvirtd. Usage:

    .venv/bin/python bench/vmimage.py [--runs 3] [--skip-commit] [--firmware bios|uefi]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, Runtime, Samples, bench_env, criv_runtime, pct

from criv.config import VmConfig
from criv.hypervisor.hostsetup import start_libvirtd
from criv.hypervisor.sizing import tb_cache_mib
from criv.vmimage import seed
from criv.vmimage.sshkeys import ensure_pod_key
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.vmimage import push_containerdisk
from tests.support.vmimagecli import vm_image_cli

BUILD = ROOT / "images" / "vm-test-disk" / "build.py"
VCPUS, MEMORY_MIB = 1, 256  # criv's vm defaults; the floor gets the same
POLL = 0.025
BOOT_TIMEOUT = 180.0


def banner(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when ``host:port`` sends an SSH version line."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def wait_banner(host: str, port: int, t0: float, stop: threading.Event | None = None) -> float:
    while not (stop is not None and stop.is_set()):
        if banner(host, port):
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > BOOT_TIMEOUT:
            break
        time.sleep(POLL)
    return float("nan")


def poll_banner(host: str, t0: float, stop: threading.Event, out: list[float]) -> None:
    out.append(wait_banner(host, 22, t0, stop))


def test_disk(firmware: str) -> Path:
    r = subprocess.run(
        [sys.executable, str(BUILD), "--firmware", firmware],
        capture_output=True, text=True, timeout=900, check=True,
    )  # fmt: skip
    return Path(r.stdout.strip().splitlines()[-1])


def qemu_floor(disk: Path, runs: int, work: Path, uefi: VmConfig | None) -> Samples:
    """Plain QEMU on an overlay of ``disk`` (user networking, a forwarded port) to a banner;
    with ``uefi``, under its OVMF (code read-only, a copy of the variable store)."""
    s: Samples = {}
    key = ensure_pod_key(work / "key", "criv-bench")
    mac = "52:54:00:c0:ff:ee"
    for i in range(runs):
        d = work / f"floor{i}"
        d.mkdir(parents=True)
        overlay = d / "overlay.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(disk),
             str(overlay)], check=True,
        )  # fmt: skip
        iso = seed.build_seed(
            seed.SeedConfig(
                instance_id=f"i-{uuid.uuid4().hex}", hostname=f"floor{i}",
                addresses=("10.0.2.15/24",), gateway="10.0.2.2", dns_servers=("10.0.2.3",),
                ssh_public_key=key.public_line, mac=mac,
            ),
            d / "seed.iso",
        )  # fmt: skip
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = int(sk.getsockname()[1])
        argv = [
            # TCG's translation cache as criv sizes it for the domain (criv/hypervisor/sizing)
            "qemu-system-x86_64", "-accel", f"tcg,tb-size={tb_cache_mib(MEMORY_MIB)}",
            "-M", "q35", "-cpu", "max",
            "-m", str(MEMORY_MIB), "-smp", str(VCPUS), "-nodefaults", "-no-user-config",
            "-display", "none", "-machine", "graphics=off", "-serial", f"file:{d / 'console.log'}",
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-drive", f"file={iso},if=virtio,format=raw,readonly=on",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac}", "-device", "virtio-rng-pci",
        ]  # fmt: skip
        if uefi is not None:
            shutil.copyfile(uefi.uefi_vars, d / "vars.fd")
            argv += [
                "-drive", f"if=pflash,format=raw,readonly=on,file={uefi.uefi_code}",
                "-drive", f"if=pflash,format=raw,file={d / 'vars.fd'}",
            ]  # fmt: skip
        t0 = time.perf_counter()
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            s.setdefault("banner", []).append(wait_banner("127.0.0.1", port, t0))
        finally:
            qemu.kill()
            qemu.wait()
    return s


def pod_ip(r: Runtime, pod: str) -> str:
    st = r.rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod), timeout=30)
    return str(st.status.network.ip)


def criv_runs(r: Runtime, ref: str, runs: int, logs: Path, commit: bool) -> Samples:
    s: Samples = {}
    for i in range(runs):
        cfg = r.pod_config(logs)
        t0 = time.perf_counter()
        req = api_pb2.RunPodSandboxRequest(config=cfg, runtime_handler="vm-image")
        pod = r.rt.RunPodSandbox(req, timeout=300).pod_sandbox_id
        ctr = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name="vm"), image=api_pb2.ImageSpec(image=ref)
        )
        creq = api_pb2.CreateContainerRequest(pod_sandbox_id=pod, config=ctr, sandbox_config=cfg)
        cid = r.rt.CreateContainer(creq, timeout=300).container_id
        r.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=300)
        s.setdefault("started", []).append(time.perf_counter() - t0)
        got: list[float] = []
        done = threading.Event()
        poller = threading.Thread(
            target=poll_banner, args=(pod_ip(r, pod), t0, done, got), daemon=True
        )
        poller.start()
        try:
            ex = api_pb2.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=30)
            resp = r.rt.ExecSync(ex, timeout=BOOT_TIMEOUT + 60)
            assert resp.exit_code == 0, resp
            s.setdefault("exec", []).append(time.perf_counter() - t0)
            poller.join(BOOT_TIMEOUT)
            s.setdefault("banner", []).extend(got)
            t1 = time.perf_counter()
            stop = api_pb2.StopContainerRequest(container_id=cid, timeout=60)
            r.rt.StopContainer(stop, timeout=120)
            s.setdefault("stop", []).append(time.perf_counter() - t1)
            if commit:
                assert r.proc is not None
                t1 = time.perf_counter()
                out = vm_image_cli(
                    r.proc.config_path, "commit", cid, f"bench/commit:{i}", timeout=600
                )
                assert out.returncode == 0, out.stderr
                s.setdefault("commit", []).append(time.perf_counter() - t1)
        finally:
            done.set()
            r.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=300)
            r.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=300)
    return s


def has_commit() -> bool:
    r = subprocess.run(
        [str(Path(sys.executable).parent / "criv"), "vm-image", "commit", "--help"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    return r.returncode == 0


def report(results: dict[str, Samples], notes: list[str]) -> None:
    print(f"\n{'runtime':<14}{'metric':<10}{'p50':>10}{'p90':>10}{'runs':>6}")
    print("-" * 50)
    for name, s in results.items():
        for metric, xs in s.items():
            print(f"{name:<14}{metric:<10}{pct(xs, 0.5):>8.0f}ms{pct(xs, 0.9):>8.0f}ms{len(xs):>6}")
    floor = results.get("qemu floor", {}).get("banner")
    crivs = results.get("criv vm-image", {})
    if floor:
        f50 = pct(floor, 0.5)
        print("\nratios to the QEMU floor's banner (p50):")
        for metric in ("banner", "exec"):
            if crivs.get(metric):
                print(f"  criv {metric:<8}{pct(crivs[metric], 0.5) / f50:>6.2f}x")
    for n in notes:
        print(f"note: {n}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-commit", action="store_true")
    ap.add_argument("--firmware", choices=("bios", "uefi"), default="bios")
    args = ap.parse_args()
    start_libvirtd()
    disk = test_disk(args.firmware)
    results: dict[str, Samples] = {}
    notes: list[str] = []
    commit = not args.skip_commit and has_commit()
    if not commit and not args.skip_commit:
        notes.append("`criv vm-image commit` is not in this criv: no commit figure")
    cfg = {
        "vm": {"accel": "tcg", "vcpus": VCPUS, "memory_mib": MEMORY_MIB},
        "runtime": {"handlers": {"": "vm", "vm": "vm", "vm-image": "vm-image"}},
    }
    with bench_env("criv-bench-vmi-") as env:
        print(f"qemu floor: {args.runs} runs...", flush=True)
        uefi = VmConfig() if args.firmware == "uefi" else None
        results["qemu floor"] = qemu_floor(disk, args.runs, env.root / "floor", uefi)
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=env.root)))
            ref = push_containerdisk(env.registry, disk, tmp)
            r = stack.enter_context(criv_runtime(env.root, env.registry, env.cni, cfg, "criv-vmi"))
            r.pull(ref)
            print(f"criv vm-image: {args.runs} runs...", flush=True)
            results["criv vm-image"] = criv_runs(r, ref, args.runs, env.logs, commit)
    report(results, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
