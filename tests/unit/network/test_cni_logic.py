"""CNI config handling and result parsing (no plugins run)."""

from __future__ import annotations

import pytest

from criv.errors import FailedPrecondition
from criv.network.cni import NetworkList, PortMapping, _plugin_error, parse_ips, plugin_conf

RESULT_1_0 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "criv0", "mac": "aa"},
        {"name": "veth1", "mac": "bb"},
        {"name": "eth0", "mac": "cc", "sandbox": "/run/netns/x"},
    ],
    "ips": [
        {"interface": 0, "address": "10.210.0.1/16"},
        {"interface": 2, "address": "fd00::5/64"},
        {"interface": 2, "address": "10.210.0.7/16", "gateway": "10.210.0.1"},
    ],
}


def test_parse_ips_sandbox_interface_ipv4_first() -> None:
    assert parse_ips(RESULT_1_0) == ["10.210.0.7", "fd00::5"]


def test_parse_ips_without_interfaces_and_old_versions() -> None:
    assert parse_ips({"ips": [{"address": "10.1.2.3/24"}]}) == ["10.1.2.3"]
    assert parse_ips({"ip4": {"ip": "10.9.9.9/8"}, "ip6": {"ip": "fd::1/64"}}) == [
        "10.9.9.9",
        "fd::1",
    ]
    assert parse_ips({}) == []
    assert parse_ips({"ips": [{"address": "garbage"}, "nonsense"]}) == []


def test_network_list_from_conf_and_conflist() -> None:
    single = NetworkList.from_dict(
        {"cniVersion": "0.4.0", "name": "n", "type": "bridge", "bridge": "b0"}
    )
    assert single.plugins == [{"type": "bridge", "bridge": "b0"}]
    assert single.cni_version == "0.4.0"
    with pytest.raises(FailedPrecondition):
        NetworkList.from_dict({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]})
    with pytest.raises(FailedPrecondition):
        NetworkList.from_dict({"name": "n", "plugins": [{"notype": 1}]})


def test_plugin_conf_chaining_and_capabilities() -> None:
    net = NetworkList("criv", "1.0.0", [])
    pm = [PortMapping(8080, 80), PortMapping(0, 53, "udp")]
    bridge = plugin_conf(net, {"type": "bridge", "runtimeConfig": {"x": 1}}, None, pm)
    assert bridge == {"type": "bridge", "name": "criv", "cniVersion": "1.0.0"}
    prev: dict[str, object] = {"ips": []}
    portmap = plugin_conf(
        net, {"type": "portmap", "capabilities": {"portMappings": True}}, prev, pm
    )
    assert portmap["prevResult"] == prev
    # only mappings with a host port, only for a plugin declaring the capability
    assert portmap["runtimeConfig"] == {
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]
    }
    with_ip = PortMapping(9090, 90, "tcp", "127.0.0.1").to_cni()
    assert with_ip["hostIP"] == "127.0.0.1"


def test_plugin_error_text() -> None:
    assert _plugin_error(b'{"code": 7, "msg": "bad", "details": "why"}', b"") == "code 7: bad (why)"
    assert _plugin_error(b"", b"stderr text\n") == "stderr text"
    assert _plugin_error(b"", b"") == "no output"
