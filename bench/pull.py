"""Pull + unpack of a ~100 MB multi-layer image from a loopback registry: criv's
ImageManager beside ``skopeo copy docker://... oci:...`` of the same image, same run.

    .venv/bin/python bench/pull.py [--runs N] [--size-mb M]

Each pull runs in a fresh subprocess (so its peak RSS is its own, read from wait4) with
an empty store. skopeo only copies blobs into an OCI layout; criv also verifies and
unpacks every layer, so its column includes the unpack. Prints figures, never fails on
time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.images import (  # noqa: E402
    BuiltImage,
    build_image,
    build_layer,
    busybox_rootfs,
    random_layer,
)
from tests.support.registry import RegistryServer  # noqa: E402


def child(state: str, host: str, ref: str) -> None:
    """Pull ``ref`` with a fresh ImageManager; print the seconds it took."""
    from criv.config import Config, RegistriesConfig
    from criv.image.manager import ImageManager

    async def run() -> float:
        cfg = Config(state_dir=state, registries=RegistriesConfig(insecure=[host]))
        m = ImageManager(cfg)
        await m.start()
        t0 = time.perf_counter()
        await m.pull(ref)
        dt = time.perf_counter() - t0
        await m.close()
        return dt

    print(json.dumps({"seconds": asyncio.run(run())}))


def run_measured(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one child process, from wait4."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} failed with {os.waitstatus_to_exitcode(status)}")
    return wall, ru.ru_maxrss * 1024, b"".join(chunks).decode()


def build(size_mb: int) -> tuple[BuiltImage, int, int]:
    per = max(1, size_mb // 5) << 20
    layers = [build_layer(busybox_rootfs(), "gzip")]
    for i in range(3):
        layers.append(build_layer(random_layer(per, seed=100 + i, compressible=False, files=4)))
    for i in range(2):
        layers.append(build_layer(random_layer(per, seed=200 + i, compressible=True, files=200)))
    img = build_image(layers)
    compressed = sum(len(x.blob) for x in layers)
    raw = per * 5
    return img, compressed, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--child", nargs=3, metavar=("STATE", "HOST", "REF"), help=argparse.SUPPRESS)
    ap.add_argument("--push-to", metavar="REGISTRY_ROOT:PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.push_to:
        # Build and push in a child: this process stays small, so the children it
        # forks do not start with its memory high-water mark in their peak RSS.
        root, port = args.push_to.rsplit(":", 1)
        img, compressed, raw = build(args.size_mb)
        reg = RegistryServer(Path(root), port=int(port))
        reg.push_image("bench/pull", "latest", img)
        print(json.dumps({"layers": len(img.layers), "compressed": compressed, "raw": raw}))
        return
    skopeo = shutil.which("skopeo")
    with tempfile.TemporaryDirectory(prefix="criv-bench-pull-") as tmp:
        t = Path(tmp)
        with RegistryServer(t / "registry") as reg:
            t0 = time.perf_counter()
            pushed = subprocess.run(
                [sys.executable, __file__, "--size-mb", str(args.size_mb),
                 "--push-to", f"{reg.root}:{reg.port}"],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            built = json.loads(pushed.stdout)
            compressed, raw = built["compressed"], built["raw"]
            took = time.perf_counter() - t0
            print(
                f"built and pushed: {built['layers']} layers, {raw / 1e6:.0f} MB of files, "
                f"{compressed / 1e6:.0f} MB compressed ({took:.1f}s)"
            )
            ref = reg.ref("bench/pull")
            policy = t / "policy.json"
            policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
            rows: dict[str, list[tuple[float, int]]] = {"criv": [], "criv-proc": [], "skopeo": []}
            for i in range(args.runs):
                state = t / f"state{i}"
                wall, rss, out = run_measured(
                    [sys.executable, __file__, "--child", str(state), reg.host, ref]
                )
                rows["criv"].append((json.loads(out)["seconds"], rss))
                rows["criv-proc"].append((wall, rss))
                shutil.rmtree(state, ignore_errors=True)
                if skopeo:
                    dest = t / f"oci{i}"
                    wall, rss, _ = run_measured(
                        [skopeo, "--policy", str(policy), "copy", "--quiet",
                         "--src-tls-verify=false", f"docker://{ref}", f"oci:{dest}:latest"]
                    )  # fmt: skip
                    rows["skopeo"].append((wall, rss))
                    shutil.rmtree(dest, ignore_errors=True)
    print()
    print(f"{'tool':<34}{'median s':>10}{'min s':>9}{'MB/s':>8}{'peak RSS MiB':>14}")
    med: dict[str, tuple[float, float]] = {}
    for name, label in (("criv", "criv pull+unpack (in process)"),
                        ("criv-proc", "criv pull+unpack (whole process)"),
                        ("skopeo", "skopeo copy docker:// -> oci:")):  # fmt: skip
        r = rows[name]
        if not r:
            print(f"{label:<34}{'(skopeo not installed)':>41}")
            continue
        secs = statistics.median(x for x, _ in r)
        peak = max(y for _, y in r) / 2**20
        med[name] = (secs, peak)
        mbps = compressed / 1e6 / secs
        print(f"{label:<34}{secs:>10.2f}{min(x for x, _ in r):>9.2f}{mbps:>8.0f}{peak:>14.1f}")
    if len(med) == 3:
        print(
            f"{'ratio criv (process) / skopeo':<34}"
            f"{med['criv-proc'][0] / med['skopeo'][0]:>10.2f}"
            f"{'':>9}{'':>8}{med['criv-proc'][1] / med['skopeo'][1]:>14.2f}"
        )
    print(
        f"\n{args.runs} runs each, empty store each time; skopeo copies blobs only, criv "
        "also verifies diff ids and unpacks; RSS is each process's peak (wait4)."
    )


if __name__ == "__main__":
    main()
