"""A pod's scratch filesystem with real loop mounts and overlays, no VM: writes in a
container stop at the pod's limit with ENOSPC while the host pays at most the limit;
teardown leaves no mount or loop device; recovery keeps a known pod's scratch and
sweeps an unknown pod's. The time the lazy create takes is printed (run with -s)."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import time
from pathlib import Path

import pytest

from criv.config import Config
from criv.mounts import is_mounted, mounts_under
from criv.sandbox.manager import SandboxManager
from criv.sandbox.rootfs import mount_rootfs, unmount_all_under, unmount_rootfs
from criv.sandbox.scratch import IMAGE, MOUNT, LoopScratch
from criv.sandbox.specs import ContainerSpec, PodSpec
from criv.state.runtime_state import RuntimeState
from tests.unit.sandbox.fakes import FakeImages, FakeIsolation, FakeNetwork, FakeRootfs, Steps

LIMIT_MIB = 64
CID, CID2 = "a" * 64, "b" * 64


def _loops_backed_under(root: Path) -> list[str]:
    """Loop devices whose backing file is (or was, "(deleted)") under ``root``."""
    out = []
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if f.read_text().strip().startswith(str(root)):
                out.append(f.parent.parent.name)
        except OSError:
            continue  # detached meanwhile
    return out


def _no_loops_under(root: Path) -> list[str]:
    # an autoclear loop device is released as its last user goes: give the kernel a moment
    for _ in range(100):
        if not (left := _loops_backed_under(root)):
            return []
        time.sleep(0.05)
    return left


def _host_bytes(top: Path) -> int:
    """Bytes allocated on the host filesystem under ``top``, not entering mounts."""
    dev = top.stat().st_dev
    total = 0
    for d, dirs, files in os.walk(top):
        dirs[:] = [x for x in dirs if os.lstat(os.path.join(d, x)).st_dev == dev]
        for name in files:
            total += os.lstat(os.path.join(d, name)).st_blocks * 512
    return total


def _fill(path: Path) -> tuple[int, int]:
    """Write 1 MiB blocks to ``path`` until the filesystem refuses: (bytes, errno)."""
    block, written = b"x" * (1 << 20), 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while written < 4 * (LIMIT_MIB << 20):
            written += os.write(fd, block)
            os.fsync(fd)
    except OSError as e:
        return written, e.errno or 0
    finally:
        os.close(fd)
    return written, 0


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    d = tmp_path / "layer"
    (d / "etc").mkdir(parents=True)
    (d / "etc" / "hostname").write_text("image\n")
    return d


def test_writes_stop_at_the_pods_limit_and_teardown_leaves_nothing(
    tmp_path: Path, layer: Path
) -> None:
    pod = tmp_path / "pod"
    pod.mkdir()
    scratch = LoopScratch(LIMIT_MIB)

    async def go() -> None:
        t0 = time.monotonic()
        wdir = await scratch.prepare(pod, CID)
        made_ms = (time.monotonic() - t0) * 1000
        print(f"\nscratch fs of {LIMIT_MIB} MiB (truncate+mkfs+mount): {made_ms:.1f} ms")
        assert wdir == pod / MOUNT / CID and is_mounted(pod / MOUNT)
        img = (pod / IMAGE).stat()
        assert img.st_size == LIMIT_MIB << 20 and img.st_mode & 0o777 == 0o600
        assert img.st_blocks * 512 < (LIMIT_MIB << 20) // 2, "the image is sparse"
        # a second container of the pod goes in the same filesystem
        assert await scratch.prepare(pod, CID2) == pod / MOUNT / CID2
        assert (pod / IMAGE).stat().st_ino == img.st_ino
        assert await scratch.locate(pod, CID) == wdir

        rootfs = await mount_rootfs([layer], pod / "c" / CID, wdir)
        try:
            written, err = await asyncio.to_thread(_fill, rootfs / "fill")
            assert err == errno.ENOSPC, "the container's write fails with ENOSPC"
            assert 0 < written <= LIMIT_MIB << 20
            assert (rootfs / "etc" / "hostname").read_text() == "image\n"
            # the host paid for the image only, never beyond the limit
            assert _host_bytes(tmp_path) <= (LIMIT_MIB + 1) << 20
            assert not (pod / "c" / CID / "upper").exists()
            (rootfs / "fill").unlink()  # space comes back to the pod
            (rootfs / "after").write_bytes(b"y" * (1 << 20))
        finally:
            await unmount_rootfs(pod / "c" / CID, wdir)
        assert not wdir.exists() and not (pod / "c" / CID / "rootfs").exists()
        assert await scratch.locate(pod, CID) is None
        # the pod's teardown (RemovePodSandbox): unmount everything under it, delete it
        await unmount_all_under(pod)
        await asyncio.to_thread(shutil.rmtree, pod)

    asyncio.run(go())
    assert not mounts_under(tmp_path)
    assert _no_loops_under(tmp_path) == [], "loop device left"


def test_a_limit_of_zero_keeps_layers_under_the_container_dir(tmp_path: Path) -> None:
    assert asyncio.run(LoopScratch(0).prepare(tmp_path, CID)) is None
    assert list(tmp_path.iterdir()) == []


def _manager(tmp_path: Path, isolations: dict[str, FakeIsolation]) -> SandboxManager:
    cfg = Config(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"))
    steps = Steps()
    return SandboxManager(
        cfg, FakeImages(), RuntimeState(tmp_path / "rs"), isolations,
        FakeNetwork(steps, tmp_path / "run"), FakeRootfs(steps), LoopScratch(LIMIT_MIB),
    )  # fmt: skip


def test_recovery_keeps_a_known_pods_scratch_and_sweeps_an_unknown_pods(tmp_path: Path) -> None:
    steps = Steps()
    isolations = {"vm": FakeIsolation(steps, "vm", True)}  # outlives criv, as VMs do
    spec = PodSpec(name="p", namespace="ns", uid="u", attempt=0, config=b"", handler="",
                   log_directory=str(tmp_path / "logs"))  # fmt: skip

    async def go() -> None:
        mgr = _manager(tmp_path, isolations)
        await mgr.start()
        pod_id = await mgr.run_pod(spec)
        await mgr.create_container(pod_id, ContainerSpec(name="c", attempt=0, config=b"",
                                                         image="busybox"))  # fmt: skip
        known = mgr.paths(pod_id).state
        assert is_mounted(known / MOUNT)
        (known / MOUNT / "kept").write_text("still here\n")
        await mgr.close()
        # criv is down; an unknown pod's scratch is left mounted (no record for it)
        unknown = mgr.ctx.state_root / ("f" * 64)
        unknown.mkdir()
        await LoopScratch(LIMIT_MIB).prepare(unknown, CID)
        assert _loops_backed_under(unknown)

        mgr = _manager(tmp_path, isolations)
        await mgr.start()
        assert is_mounted(known / MOUNT), "a live pod's scratch is kept"
        assert (known / MOUNT / "kept").read_text() == "still here\n"
        assert not is_mounted(unknown / MOUNT) and not unknown.exists()
        assert _no_loops_under(unknown) == []
        await mgr.remove_pod(pod_id)
        assert not known.exists()
        await mgr.close()

    asyncio.run(go())
    assert not mounts_under(tmp_path)
    assert _no_loops_under(tmp_path) == []
