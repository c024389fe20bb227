"""vm isolation without VMs: the guest's view of paths and network, tap naming, CNI results
turned into guest addressing, the agent's iproute2 commands and vsock addresses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from criv.agent.convert import guest_network
from criv.config import Config
from criv.errors import Internal
from criv.network.tap import guest_addressing, tap_name
from criv.sandbox.isolation import PodPaths
from criv.sandbox.isostate import VmState
from criv.sandbox.records import PodRecord
from criv.sandbox.states import PodState
from criv.sandbox.vm import GUEST_SHARED, VmIsolation
from criv.state.runtime_state import RuntimeState
from criv_agent import address, network
from criv_agent.errors import InvalidArgument

# what the bridge plugin + host-local IPAM answer (CNI 1.0.0)
BRIDGE_RESULT: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
        {"name": "vethabc", "mac": "aa:aa:aa:aa:aa:02"},
        {"name": "eth0", "mac": "aa:aa:aa:aa:aa:03", "sandbox": "/run/netns/x"},
    ],
    "ips": [
        {"interface": 2, "address": "10.88.0.7/16", "gateway": "10.88.0.1"},
        {"interface": 2, "address": "fd00::7/64", "gateway": "fd00::1"},
        {"interface": 0, "address": "10.88.0.1/16"},
    ],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}, {"dst": "192.168.0.0/24", "gw": "10.88.0.9"}],
}


def test_guest_addressing_from_a_bridge_result() -> None:
    addrs, routes = guest_addressing(BRIDGE_RESULT)
    assert addrs == ["10.88.0.7/16", "fd00::7/64"]
    assert routes == [
        ("0.0.0.0/0", "10.88.0.1"),
        ("::/0", "fd00::1"),
        ("192.168.0.0/24", "10.88.0.9"),
    ]
    assert guest_addressing({}) == ([], [])
    assert guest_addressing({"ips": [{"address": "bogus"}], "routes": [{"dst": 5}]}) == ([], [])


def test_tap_names_fit_ifnamsiz() -> None:
    name = tap_name("0123456789abcdef" * 4)
    assert name == "crivt0123456789" and len(name) <= 15


def _iso(tmp_path: Path) -> VmIsolation:
    cfg = Config(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"))
    return VmIsolation(cfg, RuntimeState(tmp_path))


def _pod(**kw: Any) -> PodRecord:
    base: dict[str, Any] = dict(
        id="ab" * 32, name="p", namespace="n", uid="u", attempt=0, state=PodState.READY,
        created_at_ns=1, handler="", isolation="vm", config=b"",
    )  # fmt: skip
    base.update(kw)
    return PodRecord(**base)


def test_agent_paths_are_guest_paths_under_the_share(tmp_path: Path) -> None:
    iso = _iso(tmp_path)
    paths = PodPaths(tmp_path / "s", tmp_path / "r")
    assert iso.agent_path(paths, paths.shared) == GUEST_SHARED
    assert iso.agent_path(paths, paths.shared / "c/x/rootfs") == f"{GUEST_SHARED}/c/x/rootfs"
    with pytest.raises(Internal):
        iso.agent_path(paths, Path("/etc/passwd"))
    assert iso.data_endpoint(paths) == f"{paths.run}/vs.1025"


def test_guest_network_from_the_record(tmp_path: Path) -> None:
    iso = _iso(tmp_path)
    assert iso.guest_network(_pod()) is None  # no tap: nothing to configure
    pod = _pod(cni_result=BRIDGE_RESULT, isolation_state=VmState(mac="aa:aa:aa:aa:aa:03", mtu=1450))
    net = iso.guest_network(pod)
    assert net is not None
    msg = guest_network(net)
    assert msg.interfaces[0].mac == "aa:aa:aa:aa:aa:03" and msg.interfaces[0].mtu == 1450
    steps = network.commands(msg, nic_of=lambda mac: "eth0", index_of=lambda dev: 2)
    assert [s.words for s in steps] == [
        ["link", "set", "dev", "eth0", "mtu", "1450"],
        ["link", "set", "dev", "eth0", "up"],
        ["addr", "replace", "10.88.0.7/16", "dev", "eth0"],
        ["addr", "replace", "fd00::7/64", "dev", "eth0"],
        ["route", "replace", "0.0.0.0/0", "via", "10.88.0.1", "dev", "eth0"],
        ["route", "replace", "::/0", "via", "fd00::1", "dev", "eth0"],
        ["route", "replace", "192.168.0.0/24", "via", "10.88.0.9", "dev", "eth0"],
    ]


def test_agent_refuses_bad_network_input(tmp_path: Path) -> None:
    from criv_agent.api.agent.v1 import agent_pb2

    bad = agent_pb2.GuestNetwork(interfaces=[agent_pb2.GuestInterface(mac="x", addresses=["nope"])])
    with pytest.raises(InvalidArgument):
        network.commands(bad, nic_of=lambda mac: "eth0", index_of=lambda dev: 2)
    bad_route = agent_pb2.GuestNetwork(routes=[agent_pb2.GuestRoute(destination="1.2.3.4/8",
                                                                    gateway="zz")])  # fmt: skip
    with pytest.raises(InvalidArgument):
        network.commands(bad_route)
    (tmp_path / "eth7").mkdir()
    (tmp_path / "eth7" / "address").write_text("AA:BB:CC:00:11:22\n")
    assert network.nic_by_mac("aa:bb:cc:00:11:22", str(tmp_path)) == "eth7"
    with pytest.raises(InvalidArgument):
        network.nic_by_mac("aa:bb:cc:00:11:23", str(tmp_path))


def test_vsock_addresses() -> None:
    a = address.parse("vsock:1024")
    assert (a.scheme, a.port, str(a)) == ("vsock", 1024, "vsock:1024")
    with pytest.raises(ValueError):
        address.parse("vsock:x")
