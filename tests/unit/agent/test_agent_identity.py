"""The agent takes a pod VM's identity at SetupSandbox (criv_agent/identity.py), with every
operation on the machine faked: the clock, the RNG ioctls, the share's mount, time itself.
Also the NIC wait of network.py (a fake sysfs dir) and the servicer's wiring."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn, cast

import pytest

from criv_agent import identity, network
from criv_agent.api.agent.v1 import agent_pb2
from criv_agent.errors import FailedPrecondition, InvalidArgument
from criv_agent.identity import IdentityTaker, Ops
from criv_agent.runtime import Runtime
from criv_agent.service import AgentService

MID = "0123456789abcdef0123456789abcdef"
NOW = 1_750_000_000_123_456_789


class Machine:
    """A fake guest: records what was done to it; its share's device shows up after
    ``mount_fails`` refused mounts; time moves only when the taker sleeps."""

    def __init__(self, tmp_path: Path, mount_fails: int = 0, ioctl_fails: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.now = 100.0
        self.mounted = False
        self.unbound_polls = 0  # looks for the virtio-fs device before it is bound
        self.mount_fails = mount_fails
        self.ioctl_fails = ioctl_fails
        self.machine_id = tmp_path / "etc" / "machine-id"
        self.machine_id.parent.mkdir()
        self.shared = tmp_path / "run" / "criv" / "shared"

    def ops(self) -> Ops:
        return Ops(
            set_clock=lambda ns: self.calls.append(("clock", ns)),
            add_entropy=self._add_entropy,
            write_urandom=lambda b: self.calls.append(("urandom", b)),
            reseed_python=lambda: self.calls.append(("random.seed",)),
            machine_id_path=str(self.machine_id),
            shared_dir=str(self.shared),
            is_mountpoint=lambda path: self.mounted,
            fs_device_bound=self._bound,
            mount=self._mount,
            monotonic=lambda: self.now,
            sleep=self._sleep,
        )

    def _bound(self) -> bool:
        self.unbound_polls -= 1
        return self.unbound_polls < 0

    def _add_entropy(self, b: bytes) -> None:
        self.calls.append(("ioctl", b))
        if self.ioctl_fails:
            raise PermissionError(errno.EPERM, "Operation not permitted")

    def _mount(self, tag: str, target: str) -> None:
        self.calls.append(("mount", tag, target))
        if self.mount_fails > 0:
            self.mount_fails -= 1
            raise OSError(errno.EINVAL, "Invalid argument")
        self.mounted = True

    async def _sleep(self, seconds: float) -> None:
        self.now += seconds

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]


def ident(**kw: Any) -> agent_pb2.GuestIdentity:
    base: dict[str, Any] = dict(
        entropy=b"\x01" * 64, host_time_ns=NOW, machine_id=MID, share_tag="criv", wait_seconds=20
    )
    base.update(kw)
    return agent_pb2.GuestIdentity(**base)


async def test_a_vm_takes_clock_entropy_machine_id_and_share_in_that_order(
    tmp_path: Path,
) -> None:
    m = Machine(tmp_path)
    left = await IdentityTaker(in_vm=True, ops=m.ops()).take(ident())
    assert m.calls == [
        ("clock", NOW),
        ("ioctl", b"\x01" * 64),
        ("random.seed",),
        ("mount", "criv", str(m.shared)),
    ]
    assert m.machine_id.read_text() == MID + "\n"
    assert stat.S_IMODE(m.machine_id.stat().st_mode) == 0o444
    assert m.shared.is_dir()
    assert left == 20.0  # the whole budget is left for the NIC


async def test_a_late_share_is_waited_for_and_the_rest_of_the_budget_returned(
    tmp_path: Path,
) -> None:
    m = Machine(tmp_path, mount_fails=10)
    left = await IdentityTaker(in_vm=True, ops=m.ops()).take(ident(wait_seconds=2))
    assert m.kinds().count("mount") == 11 and m.mounted
    assert left == pytest.approx(2 - 10 * identity.POLL)


async def test_no_mount_is_tried_before_a_virtio_fs_device_is_bound(tmp_path: Path) -> None:
    m = Machine(tmp_path)
    m.unbound_polls = 5  # the hot-plugged device's driver binds after 5 looks
    await IdentityTaker(in_vm=True, ops=m.ops()).take(ident(wait_seconds=2))
    assert m.kinds().count("mount") == 1 and m.mounted
    assert m.now == pytest.approx(100 + 5 * identity.POLL)


async def test_a_share_that_never_comes_is_a_failed_precondition_after_the_wait(
    tmp_path: Path,
) -> None:
    m = Machine(tmp_path, mount_fails=1_000_000)
    with pytest.raises(FailedPrecondition, match=r"virtio-fs tag 'criv'.*within 1 s"):
        await IdentityTaker(in_vm=True, ops=m.ops()).take(ident(wait_seconds=1))
    assert 100.99 < m.now < 101.1


async def test_a_share_already_mounted_or_not_asked_for_is_left_alone(tmp_path: Path) -> None:
    m = Machine(tmp_path)
    m.mounted = True  # a cold-booted VM: images/init mounted it
    await IdentityTaker(in_vm=True, ops=m.ops()).take(ident())
    assert "mount" not in m.kinds()
    (tmp_path / "2").mkdir()
    m2 = Machine(tmp_path / "2")
    await IdentityTaker(in_vm=True, ops=m2.ops()).take(ident(share_tag=""))
    assert "mount" not in m2.kinds() and not m2.shared.exists()


async def test_refused_rng_ioctls_fall_back_to_writing_urandom(tmp_path: Path) -> None:
    m = Machine(tmp_path, ioctl_fails=True)
    await IdentityTaker(in_vm=True, ops=m.ops()).take(ident(share_tag=""))
    assert m.kinds() == ["clock", "ioctl", "urandom", "random.seed"]
    assert m.machine_id.read_text() == MID + "\n"


@pytest.mark.parametrize(
    "bad",
    [
        dict(machine_id="0123456789ABCDEF0123456789ABCDEF"),
        dict(machine_id=MID[:31]),
        dict(machine_id=MID + "0"),
        dict(machine_id="g" * 32),
        dict(machine_id=""),
        dict(machine_id=MID + "\n"),
        dict(entropy=b"x" * (identity.MAX_ENTROPY + 1)),
        dict(entropy=b""),
        dict(host_time_ns=0),
        dict(host_time_ns=-5),
        dict(share_tag="../etc"),
        dict(share_tag="x" * 37),
        dict(share_tag="criv\n"),
    ],
)
async def test_bad_identities_are_invalid_arguments_and_change_nothing(
    tmp_path: Path, bad: dict[str, Any]
) -> None:
    m = Machine(tmp_path)
    with pytest.raises(InvalidArgument):
        await IdentityTaker(in_vm=True, ops=m.ops()).take(ident(**bad))
    assert m.calls == [] and not m.machine_id.exists() and not m.shared.exists()


def test_limits() -> None:
    assert identity.check(ident(wait_seconds=3600)).wait_seconds == identity.MAX_WAIT
    full = identity.check(ident(entropy=b"y" * identity.MAX_ENTROPY))
    assert len(full.entropy) == identity.MAX_ENTROPY


async def test_a_host_mode_agent_ignores_the_identity(tmp_path: Path) -> None:
    m = Machine(tmp_path)
    taker = IdentityTaker(in_vm=False, ops=m.ops())
    assert await taker.take(ident()) == 0.0
    assert await taker.take(ident(machine_id="not even valid")) == 0.0
    assert m.calls == [] and not m.machine_id.exists() and not m.shared.exists()


def test_the_rng_ioctls_pass_a_rand_pool_info(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, Any]] = []
    monkeypatch.setattr(identity.fcntl, "ioctl", lambda fd, req, arg=0: seen.append((req, arg)))
    identity.rnd_add_and_reseed(b"abcdefg")
    assert seen == [
        (identity.RNDADDENTROPY, struct.pack("ii", 56, 7) + b"abcdefg"),
        (identity.RNDRESEEDCRNG, 0),
    ]


# --- the NIC: network.py waits for a hot-plugged one -----------------------------------


def _nic(root: Path, name: str, mac: str) -> None:
    (root / name).mkdir()
    (root / name / "address").write_text(mac + "\n")


NET = agent_pb2.GuestNetwork(
    interfaces=[agent_pb2.GuestInterface(mac="52:54:00:aa:bb:cc", addresses=["10.88.0.5/16"])]
)


async def test_a_hot_plugged_nic_is_waited_for(tmp_path: Path) -> None:
    _nic(tmp_path, "lo", "00:00:00:00:00:00")

    async def plug() -> None:
        await asyncio.sleep(0.2)
        _nic(tmp_path, "eth0", "52:54:00:AA:BB:CC")

    plugging = asyncio.ensure_future(plug())
    nics = await network.find_nics(NET, wait_seconds=10, root=str(tmp_path))
    await plugging
    assert nics == {"52:54:00:aa:bb:cc": "eth0"}


async def test_a_missing_nic_is_an_invalid_argument_at_once_or_after_the_wait(
    tmp_path: Path,
) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(InvalidArgument, match="no network interface") as e:
        await network.find_nics(NET, root=str(tmp_path))
    assert "waiting" not in str(e.value) and loop.time() - t0 < 0.1
    with pytest.raises(InvalidArgument, match=r"after waiting 0\.3 s"):
        await network.find_nics(NET, wait_seconds=0.3, root=str(tmp_path))
    assert loop.time() - t0 >= 0.3


# --- the servicer: identity first, then the network with what is left of the wait --------


class Aborted(Exception):
    def __init__(self, code: Any, details: str) -> None:
        super().__init__(details)
        self.code = code


class Context:
    async def abort(self, code: Any, details: str) -> NoReturn:
        raise Aborted(code, details)


def _service(tmp_path: Path, in_vm: bool) -> tuple[AgentService, Machine, list[str]]:
    steps: list[str] = []

    async def setup(*args: Any) -> None:
        steps.append("pod.setup")

    runtime = cast(Runtime, SimpleNamespace(pod=SimpleNamespace(setup=setup)))
    m = Machine(tmp_path)
    return AgentService(runtime, IdentityTaker(in_vm=in_vm, ops=m.ops())), m, steps


async def test_setup_sandbox_takes_the_identity_before_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, m, steps = _service(tmp_path, in_vm=True)

    async def apply(net: agent_pb2.GuestNetwork, wait_seconds: float = 0.0) -> None:
        steps.append(f"network.apply wait={wait_seconds}")
        assert m.mounted  # the share came first

    monkeypatch.setattr(network, "apply", apply)
    req = agent_pb2.SetupSandboxRequest(sandbox_id="p", network=NET, identity=ident())
    await svc.SetupSandbox(req, Context())
    assert steps == ["network.apply wait=20.0", "pod.setup"]
    assert m.kinds() == ["clock", "ioctl", "random.seed", "mount"]

    bad = agent_pb2.SetupSandboxRequest(sandbox_id="p", identity=ident(machine_id="X"))
    with pytest.raises(Aborted) as e:
        await svc.SetupSandbox(bad, Context())
    assert e.value.code.name == "INVALID_ARGUMENT"


async def test_setup_sandbox_in_host_mode_ignores_the_identity(tmp_path: Path) -> None:
    svc, m, steps = _service(tmp_path, in_vm=False)
    req = agent_pb2.SetupSandboxRequest(sandbox_id="p", identity=ident())
    await svc.SetupSandbox(req, Context())
    assert steps == ["pod.setup"] and m.calls == []
    assert not os.path.exists(m.machine_id)
