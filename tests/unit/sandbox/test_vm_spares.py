"""Spare VMs' logic (criv/sandbox/vm/spares.py) against a fake hypervisor: when they are
made, who gets one, what is destroyed, and which names a pod's record may point at. Real
spares: tests/vm/pods/test_vm_template.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from criv.errors import FailedPrecondition
from criv.hypervisor import snapshot
from criv.hypervisor.domaininfo import DomainInfo
from criv.hypervisor.sizing import VmSize
from criv.hypervisor.spec import PodVm, domain_name
from criv.sandbox.isostate import VmState
from criv.sandbox.vm import spares as spares_mod
from criv.sandbox.vm.spares import SpareVms, is_spare_name, spare_dir, vm_domain
from criv.sandbox.vm.template import Template

IMG = Path("/var/lib/criv/cache/guest-image/image-0123456789abcdef")


def _vm() -> PodVm:
    return PodVm(
        sandbox_id="a" * 64, kernel=IMG / "vmlinux", initrd=IMG / "initramfs.cpio",
        size=VmSize(1, 256), accel="tcg", console_log=Path("/var/log/p/console.log"),
        tap="tapaaaa0", vsock_socket=Path("/run/criv/p/a/v.sock"),
    )  # fmt: skip


class FakeHv:
    def __init__(self) -> None:
        self.domains: dict[str, str] = {}  # name -> state
        self.xml: dict[str, str] = {}
        self.loads: list[str] = []
        self.fail_create = False
        self.create_delay = 0.0

    async def create(self, domain: Any, paused: bool = False) -> DomainInfo:
        await asyncio.sleep(self.create_delay)
        if self.fail_create:
            raise FailedPrecondition("no QEMU today")
        self.domains[domain.name] = "paused" if paused else "running"
        self.xml[domain.name] = domain.to_xml()
        return DomainInfo(domain.name, "uuid-" + domain.name, self.domains[domain.name], "", "")

    async def on_live(self, fn: Any, name: str, *args: Any, what: str, timeout: Any = None) -> Any:
        assert fn is snapshot.load_state, fn
        self.loads.append(name)
        self.domains[name] = "running"  # loaded, then run
        return None

    async def state(self, name: str) -> str:
        return self.domains.get(name, "gone")

    async def destroy(self, name: str) -> bool:
        return self.domains.pop(name, None) is not None

    async def wait_stopped(self, name: str, timeout: float | None = None) -> bool:
        return True

    async def destroy_quietly(self, name: str, timeout: float = 10.0) -> None:
        await self.destroy(name)


class FakeHost:
    def __init__(self, hv: FakeHv) -> None:
        self.hv = hv

    async def hypervisor(self) -> FakeHv:
        return self.hv

    async def settle_stop(self, name: str, timeout: float = 5.0) -> None:
        pass


class FakeTemplates:
    def __init__(self, root: Path, keys: set[str], building: set[str] | None = None) -> None:
        self.root, self.keys, self.building = root, keys, building or set()

    def find(self, key: str) -> Template | None:
        return Template(key, self.root / key) if key in self.keys else None

    def state(self, key: str) -> str:
        return "ready" if key in self.keys else "building" if key in self.building else "none"


def _pool(tmp_path: Path, hv: FakeHv, templates: FakeTemplates, count: int = 1) -> SpareVms:
    return SpareVms(
        tmp_path / "spares", FakeHost(hv), templates, count, "/owner", quiet=0.05,  # type: ignore[arg-type]
    )  # fmt: skip


async def _one_spare(tmp_path: Path, keys: set[str]) -> tuple[FakeHv, SpareVms, str]:
    """A pool holding one spare of template "k"; (hypervisor, pool, the spare's name)."""
    hv = FakeHv()
    pool = _pool(tmp_path, hv, FakeTemplates(tmp_path, keys))
    pool.want("k", _vm())
    await _until(lambda: len(pool.names()) == 1)
    (name,) = pool.names()
    return hv, pool, name


async def _until(cond: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.timeout(20)
def test_a_spare_is_loaded_run_taken_once_and_replaced(tmp_path: Path) -> None:
    async def go() -> None:
        hv, pool, name = await _one_spare(tmp_path, {"k"})
        assert is_spare_name(name) and hv.domains[name] == "running"
        assert hv.loads == [name]
        xml = hv.xml[name]
        # the template's shape: none of the pod's devices, names or console
        assert "tapaaaa0" not in xml and "v.sock" not in xml and "a" * 32 not in xml
        assert str(spare_dir(tmp_path / "spares", name) / "console.log") in xml
        assert "/owner" in xml  # criv's: a restarted criv sweeps it
        assert (tmp_path / "spares" / name).is_dir()

        assert await pool.take("other") is None  # another shape's pod
        spare = await pool.take("k")
        assert spare is not None and spare.name == name and spare.key == "k"
        assert await pool.take("k") is None  # served once
        await _until(lambda: len(pool.names()) == 1)  # its successor
        assert pool.names() != {name}
        await pool.release(name)  # the pod that took it is gone
        assert not (tmp_path / "spares" / name).exists()
        await pool.close()
        assert pool.names() == set() and set(hv.domains) == {name}  # the pod's stays
        assert list((tmp_path / "spares").iterdir()) == []

    asyncio.run(go())


@pytest.mark.timeout(20)
def test_a_refill_waits_until_pods_stop_starting(tmp_path: Path) -> None:
    async def go() -> None:
        hv = FakeHv()
        pool = SpareVms(
            tmp_path / "s", FakeHost(hv), FakeTemplates(tmp_path, {"k"}), 1, "", quiet=0.4,  # type: ignore[arg-type]
        )  # fmt: skip
        pool.want("k", _vm())
        for _ in range(6):  # a pod starting every 0.1 s
            await asyncio.sleep(0.1)
            pool.note_start()
        assert hv.domains == {}
        await _until(lambda: len(pool.names()) == 1)
        await pool.close()

    asyncio.run(go())


@pytest.mark.timeout(20)
def test_a_spare_that_is_not_running_is_destroyed_not_given(tmp_path: Path) -> None:
    async def go() -> None:
        hv, pool, name = await _one_spare(tmp_path, {"k"})
        hv.domains[name] = "paused"  # not as criv left it (or crashed): not a clean spare
        assert await pool.take("k") is None
        assert name not in hv.domains and not (tmp_path / "spares" / name).exists()
        await pool.close()

    asyncio.run(go())


@pytest.mark.timeout(20)
def test_another_shape_or_a_dropped_template_takes_the_spares_with_it(tmp_path: Path) -> None:
    async def go() -> None:
        hv, pool, first = await _one_spare(tmp_path, {"k", "k2"})
        pool.want("k2", _vm())
        await _until(lambda: first not in hv.domains and len(pool.names()) == 1)
        (second,) = pool.names()
        pool.drop("k2")
        await _until(lambda: second not in hv.domains)
        assert pool.names() == set() and await pool.take("k2") is None
        await pool.close()

    asyncio.run(go())


@pytest.mark.timeout(20)
def test_no_spare_without_a_template_and_none_when_switched_off(tmp_path: Path) -> None:
    async def go() -> None:
        hv = FakeHv()
        pool = _pool(tmp_path, hv, FakeTemplates(tmp_path, set()))
        pool.want("k", _vm())
        await asyncio.sleep(0.3)
        assert hv.domains == {}
        off = _pool(tmp_path, hv, FakeTemplates(tmp_path, {"k"}), count=0)
        off.want("k", _vm())
        await asyncio.sleep(0.3)
        assert hv.domains == {} and await off.take("k") is None
        await pool.close()
        await off.close()

    asyncio.run(go())


@pytest.mark.timeout(20)
def test_the_first_spare_waits_for_its_template_build(tmp_path: Path) -> None:
    async def go() -> None:
        hv = FakeHv()
        templates = FakeTemplates(tmp_path, set(), building={"k"})
        pool = _pool(tmp_path, hv, templates)
        pool.want("k", _vm())
        await asyncio.sleep(0.3)
        assert hv.domains == {}
        templates.keys.add("k")  # the build is done
        await _until(lambda: len(pool.names()) == 1, timeout=2 * spares_mod.BUILD_POLL + 2)
        await pool.close()

    asyncio.run(go())


@pytest.mark.timeout(20)
def test_a_failed_spare_leaves_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        hv = FakeHv()
        hv.fail_create = True
        pool = _pool(tmp_path, hv, FakeTemplates(tmp_path, {"k"}))
        pool.want("k", _vm())
        await _until(lambda: "spare VM of template" in caplog.text)
        assert hv.domains == {} and pool.names() == set()
        assert list((tmp_path / "spares").iterdir()) == []
        await pool.close()

    asyncio.run(go())


@pytest.mark.timeout(20)
def test_criv_stopping_mid_create_destroys_what_the_create_made(tmp_path: Path) -> None:
    async def go() -> None:
        hv = FakeHv()
        hv.create_delay = 0.3
        pool = _pool(tmp_path, hv, FakeTemplates(tmp_path, {"k"}))
        pool.want("k", _vm())
        await asyncio.sleep(0.15)  # the create is under way
        await pool.close()
        assert hv.domains == {}
        assert list((tmp_path / "spares").iterdir()) == []

    asyncio.run(go())


def test_a_record_may_point_only_at_a_spare_or_its_own_domain() -> None:
    sid = "b" * 64
    spare = "criv-spare-0123456789abcdef"
    assert vm_domain(sid, VmState(domain=spare)) == spare
    assert vm_domain(sid, None) == domain_name(sid)
    for other in ("criv-" + "c" * 32, "criv-spare-../../etc", "criv-spare-0123", "x", ""):
        assert vm_domain(sid, VmState(domain=other)) == domain_name(sid), other
    with pytest.raises(ValueError):
        spare_dir(Path("/run/criv/spares"), "../etc")
    assert not is_spare_name(spare + "\n")
