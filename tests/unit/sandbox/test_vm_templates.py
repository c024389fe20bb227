"""Templates' pure logic: which shapes share a template, the store, failed builds, and the
clone's free root ports. Real template builds and clones: tests/vm/pods/test_vm_template.py."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from criv.errors import Unavailable
from criv.hypervisor.sizing import VmSize
from criv.hypervisor.snapshot import empty_root_ports
from criv.hypervisor.spec import TEMPLATE_HOTPLUG_PORTS, PodVm, template_shape
from criv.sandbox.vm import template as tmpl
from criv.sandbox.vm.template import Templates, template_key

IMG = Path("/var/lib/criv/cache/guest-image/image-0123456789abcdef")


def _vm(**kw: object) -> PodVm:
    base: dict[str, object] = {
        "sandbox_id": "a" * 64,
        "kernel": IMG / "vmlinux",
        "initrd": IMG / "initramfs.cpio",
        "size": VmSize(1, 256),
        "accel": "tcg",
        "console_log": Path("/var/log/criv/pods/aaaa/console.log"),
        "fs_socket": Path("/run/criv/p/aaaa/fs.sock"),
        "tap": "tapaaaa0",
        "mac": "02:00:00:00:00:01",
        "vsock_socket": Path("/run/criv/p/aaaa/vhost-user.sock"),
        "agent_args": ["--control", "vsock:1024"],
    }
    base.update(kw)
    return PodVm(**base)  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_pods_of_one_shape_share_a_template_and_any_change_makes_another() -> None:
    key = template_key(_vm())
    other_pod = _vm(
        sandbox_id="b" * 64, tap="tapbbbb0", mac="02:00:00:00:00:02",
        console_log=Path("/var/log/criv/pods/bbbb/console.log"),
        fs_socket=Path("/run/criv/p/bbbb/fs.sock"),
        vsock_socket=Path("/run/criv/p/bbbb/vhost-user.sock"), owner="/elsewhere",
    )  # fmt: skip
    assert template_key(other_pod) == key
    for change in (
        {"size": VmSize(1, 512)},
        {"size": VmSize(2, 256)},
        {"max_vcpus": 4},
        {"max_memory_mib": 1024},
        {"free_page_reporting": False},
        {"initrd": Path("/var/lib/criv/cache/guest-image/image-fedcba9876543210/i.cpio")},
        {
            "root_disk": Path("/var/lib/criv/cache/guest-image/image-fedcba9876543210/r.erofs"),
            "root_disk_bytes": 2 << 20,
        },
        {"root_disk": IMG / "root.erofs", "root_disk_bytes": 4 << 20},
        {"agent_args": ["--control", "vsock:2048"]},
        {"accel": "kvm"},
    ):
        assert template_key(_vm(**change)) != key, change


@pytest.mark.timeout(10)
def test_the_store_finds_only_complete_templates_of_its_format(tmp_path: Path) -> None:
    store = Templates(tmp_path, host=None, owner="")  # type: ignore[arg-type]
    assert store.find("k") is None and store.state("k") == "none"
    d = tmp_path / "k"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"format": tmpl.FORMAT}))
    assert store.find("k") is None  # no state yet
    (d / "state.bin").write_bytes(b"x")
    assert store.find("k") is None  # no RAM yet
    (d / "ram.bin").write_bytes(b"")
    found = store.find("k")
    assert found is not None and found.state == d / "state.bin" and store.state("k") == "ready"
    (d / "meta.json").write_text(json.dumps({"format": tmpl.FORMAT + 1}))
    assert store.find("k") is None  # an older or newer criv's
    (d / "meta.json").write_text("{not json")
    assert store.find("k") is None
    store.drop("k")
    assert not d.exists()


class _FailingHost:
    def __init__(self) -> None:
        self.calls = 0

    async def hypervisor(self) -> object:
        self.calls += 1
        raise Unavailable("libvirtd is down")


@pytest.mark.timeout(10)
def test_a_failed_build_leaves_no_files_and_is_not_retried_at_once(tmp_path: Path) -> None:
    host = _FailingHost()
    store = Templates(tmp_path, host=host, owner="")  # type: ignore[arg-type]

    async def run() -> None:
        store.ensure("k", _vm())
        assert store.state("k") == "building"
        await asyncio.sleep(0.05)
        assert store.state("k") == "failed"
        store.ensure("k", _vm())  # within RETRY_AFTER: nothing
        await asyncio.sleep(0.05)
        await store.close()

    asyncio.run(run())
    assert host.calls == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(10)
def test_a_build_in_progress_is_cancelled_at_close(tmp_path: Path) -> None:
    class _SlowHost:
        async def hypervisor(self) -> object:
            await asyncio.sleep(3600)
            raise AssertionError

    store = Templates(tmp_path, host=_SlowHost(), owner="")  # type: ignore[arg-type]

    async def run() -> None:
        store.ensure("k", _vm())
        store.ensure("k", _vm())  # one build per key
        assert len(store._builds) == 1
        await asyncio.sleep(0.05)
        await store.close()
        assert store.state("k") == "none"

    asyncio.run(run())
    assert list(tmp_path.iterdir()) == []


LIVE_XML = """<domain><devices>
  <controller type='pci' index='0' model='pcie-root'/>
  <controller type='pci' index='1' model='pcie-root-port'>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0'/></controller>
  <controller type='pci' index='2' model='pcie-root-port'>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x1'/></controller>
  <controller type='pci' index='3' model='pcie-root-port'>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/></controller>
  <controller type='pci' index='4' model='pcie-root-port'>
    <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x3'/></controller>
  <memballoon model='virtio'><address type='pci' domain='0x0000' bus='0x01' slot='0x00'
    function='0x0'/></memballoon>
  <rng model='virtio'><address type='pci' domain='0x0000' bus='0x03' slot='0x00'
    function='0x0'/></rng>
</devices></domain>"""


@pytest.mark.timeout(10)
def test_free_root_ports_are_the_ones_no_device_sits_on() -> None:
    assert empty_root_ports(LIVE_XML) == [2, 4]
    assert empty_root_ports("<domain><devices/></domain>") == []


@pytest.mark.timeout(10)
def test_the_template_shape_keeps_nothing_of_the_pod() -> None:
    shape = template_shape(_vm())
    assert (shape.sandbox_id, shape.tap, shape.mac, shape.fs_socket, shape.vsock_socket) == (
        "", "", "", None, None,
    )  # fmt: skip
    assert shape.hotplug_ports == TEMPLATE_HOTPLUG_PORTS
    assert replace(shape, size=VmSize(1, 256)) == shape


def _template(root: Path, key: str, used_ago: float, **meta: object) -> Path:
    d = root / key
    d.mkdir(parents=True)
    (d / "state.bin").write_bytes(b"s")
    (d / "ram.bin").write_bytes(b"")
    (d / "meta.json").write_text(json.dumps({"format": tmpl.FORMAT, "key": key, **meta}))
    t = time.time() - used_ago
    os.utime(d / "meta.json", (t, t))
    return d


@pytest.mark.timeout(10)
def test_prune_removes_what_no_pod_will_clone_again(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.mkdir()
    (image / "vmlinux").write_bytes(b"k")
    (image / "initramfs.cpio").write_bytes(b"i")
    (image / "root.erofs").write_bytes(b"r")
    live = {
        "kernel": str(image / "vmlinux"),
        "initrd": str(image / "initramfs.cpio"),
        "root_disk": str(image / "root.erofs"),
    }
    root = tmp_path / "templates"
    fresh = _template(root, "fresh", 60, **live)
    _template(root, "unused", tmpl.MAX_UNUSED + 60, **live)
    _template(root, "image-gone", 60, kernel=live["kernel"], initrd=str(tmp_path / "old.cpio"))
    _template(root, "disk-gone", 60, **(live | {"root_disk": str(tmp_path / "old.erofs")}))
    _template(root, "no-disk", 60, **(live | {"root_disk": ""}))  # root in the initramfs
    other_format = _template(root, "newer", 60, format=tmpl.FORMAT + 1)  # a newer criv's
    busy = _template(root, "busy", tmpl.MAX_UNUSED + 60)  # being rebuilt now
    old_build = root / ".old.building"
    old_build.mkdir()
    t = time.time() - tmpl.STALE_BUILD - 60
    os.utime(old_build, (t, t))
    new_build = root / ".new.building"
    new_build.mkdir()

    gone = tmpl.prune(root, {"busy"}, time.time())
    assert sorted(gone) == [".old.building", "disk-gone", "image-gone", "unused"]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [fresh.name, other_format.name, busy.name, new_build.name, "no-disk"]
    )


@pytest.mark.timeout(10)
def test_a_clone_marks_its_template_used(tmp_path: Path) -> None:
    d = _template(tmp_path, "k", tmpl.MAX_UNUSED - 60)
    store = Templates(tmp_path, host=None, owner="")  # type: ignore[arg-type]
    assert store.find("k") is not None
    assert time.time() - (d / "meta.json").stat().st_mtime < 60
    assert tmpl.prune(tmp_path, set(), time.time() + 120) == []  # not unused any more
