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
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Runtime,
    Samples,
    bench_env,
    containerd_samples,
    criv_runtime,
    pct,
    timed,
)

from criv_agent.api.runtime.v1 import api_pb2

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
# this bench measures criv's host isolation (the agent without a VM); see podstart.py for vm
HOST_ONLY = {"runtime": {"handlers": {"": "host", "host": "host"}}}


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
    results: dict[str, Samples] = {}
    with bench_env("criv-bench-lc-") as env:
        with criv_runtime(env.root, env.registry, env.cni, HOST_ONLY) as r:
            r.pull(env.image)
            print(f"criv: {args.runs} runs...", flush=True)
            results["criv"] = measure(r, env.image, args.runs, env.logs / "criv")
        if not args.skip_containerd:
            ctrd = containerd_samples(
                env,
                f"{args.runs} runs",
                lambda r: measure(r, env.image, args.runs, env.logs / "containerd"),
            )
            if ctrd:
                results["containerd"] = ctrd
    print()
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
