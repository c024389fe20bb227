"""The guest network's rtnetlink requests (criv_agent/rtnetlink.py, network.py): what each
request says, decoded here, and the whole of ``network.apply`` against a real kernel in a
network namespace of its own, checked with ip(8)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from criv_agent import rtnetlink as R

AGENT_ROOT = Path(__file__).resolve().parents[3] / "guest-agent"


def _attrs(body: bytes, offset: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset < len(body):
        length, kind = R.RTATTR.unpack_from(body, offset)
        out[kind] = body[offset + R.RTATTR.size : offset + length]
        offset += (length + 3) & ~3
    return out


def test_an_ipv4_route_via_a_gateway_is_universe_scope_in_the_main_table() -> None:
    req = R.route_replace(
        ipaddress.ip_network("192.168.0.0/24"), ipaddress.ip_address("10.88.0.9"), 3
    )
    assert req.type == R.RTM_NEWROUTE and req.flags == R.NLM_F_CREATE | R.NLM_F_REPLACE
    family, dst_len, _src, _tos, table, proto, scope, kind, _flags = R.RTMSG.unpack_from(req.body)
    assert (family, dst_len, table, proto, scope, kind) == (
        socket.AF_INET, 24, R.RT_TABLE_MAIN, R.RTPROT_BOOT, R.RT_SCOPE_UNIVERSE, R.RTN_UNICAST
    )  # fmt: skip
    attrs = _attrs(req.body, R.RTMSG.size)
    assert attrs[R.RTA_DST] == bytes([192, 168, 0, 0])
    assert attrs[R.RTA_GATEWAY] == bytes([10, 88, 0, 9])
    assert struct.unpack("=i", attrs[R.RTA_OIF]) == (3,)


def test_a_default_route_names_no_destination_and_an_ipv4_route_without_gateway_is_on_link() -> (
    None
):
    default = R.route_replace(ipaddress.ip_network("::/0"), ipaddress.ip_address("fd00::1"), 2)
    assert R.RTMSG.unpack_from(default.body)[:2] == (socket.AF_INET6, 0)
    assert R.RTA_DST not in _attrs(default.body, R.RTMSG.size)
    on_link = R.route_replace(ipaddress.ip_network("10.1.0.0/16"), None, 2)
    assert R.RTMSG.unpack_from(on_link.body)[6] == R.RT_SCOPE_LINK
    assert R.RTA_GATEWAY not in _attrs(on_link.body, R.RTMSG.size)
    with pytest.raises(ValueError, match="family"):
        R.route_replace(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_address("fd00::1"), 2)


def test_an_address_is_its_own_peer_and_a_link_request_changes_only_what_it_names() -> None:
    req = R.addr_replace(4, ipaddress.ip_interface("fd00::7/64"))
    assert req.type == R.RTM_NEWADDR and req.flags == R.NLM_F_CREATE | R.NLM_F_REPLACE
    assert R.IFADDRMSG.unpack_from(req.body) == (socket.AF_INET6, 64, 0, R.RT_SCOPE_UNIVERSE, 4)
    attrs = _attrs(req.body, R.IFADDRMSG.size)
    assert attrs[R.IFA_LOCAL] == attrs[R.IFA_ADDRESS] == ipaddress.ip_address("fd00::7").packed
    mtu = R.link_mtu(4, 1450)
    assert R.IFINFOMSG.unpack_from(mtu.body) == (socket.AF_UNSPEC, 0, 4, 0, 0)  # flags untouched
    assert _attrs(mtu.body, R.IFINFOMSG.size) == {R.IFLA_MTU: struct.pack("=I", 1450)}
    assert R.IFINFOMSG.unpack_from(R.link_up(4).body)[3:] == (R.IFF_UP, R.IFF_UP)


_CHILD = r"""
import asyncio, json, subprocess, sys
from criv_agent import network
from criv_agent.api.agent.v1 import agent_pb2
from criv_agent.errors import RuntimeFailure

def ip(*args):
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout

ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
ip("link", "set", "dev", "v1", "up")
mac = open("/sys/class/net/v0/address").read().strip()
net = agent_pb2.GuestNetwork(
    interfaces=[
        agent_pb2.GuestInterface(mac=mac, mtu=1400, addresses=["10.88.0.7/16", "fd00::7/64"])
    ],
    routes=[
        agent_pb2.GuestRoute(destination="0.0.0.0/0", gateway="10.88.0.1"),
        agent_pb2.GuestRoute(destination="192.168.0.0/24", gateway="10.88.0.9"),
        agent_pb2.GuestRoute(destination="::/0", gateway="fd00::1"),
    ],
)
asyncio.run(network.apply(net))
asyncio.run(network.apply(net))  # again: replaces, changes nothing
unreachable = agent_pb2.GuestNetwork(
    interfaces=[agent_pb2.GuestInterface(mac=mac)],
    routes=[agent_pb2.GuestRoute(destination="0.0.0.0/0", gateway="172.31.0.1")],
)
try:
    asyncio.run(network.apply(unreachable))
    error = ""
except RuntimeFailure as e:
    error = str(e)
print(json.dumps({
    "link": json.loads(ip("-j", "link", "show", "dev", "v0")),
    "addr": json.loads(ip("-j", "addr", "show", "dev", "v0")),
    "route4": json.loads(ip("-j", "-4", "route", "show")),
    "route6": json.loads(ip("-j", "-6", "route", "show")),
    "error": error,
}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root")
@pytest.mark.timeout(60)
def test_apply_configures_a_real_link_in_a_namespace_of_its_own() -> None:
    # a new network namespace, and a mount namespace whose /sys shows its links
    unshare = ["unshare", "--net", "--mount", "--propagation", "private"]
    script = 'mount -t sysfs sysfs /sys && exec "$0" -c "$1"'
    out = subprocess.run(
        [*unshare, "sh", "-c", script, sys.executable, _CHILD],
        env=dict(os.environ, PYTHONPATH=str(AGENT_ROOT)),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    link = got["link"][0]
    assert link["mtu"] == 1400 and "UP" in link["flags"]
    addrs = {(a["local"], a["prefixlen"]) for a in got["addr"][0]["addr_info"]}
    assert {("10.88.0.7", 16), ("fd00::7", 64)} <= addrs
    route4 = {(r["dst"], r.get("gateway"), r["dev"]) for r in got["route4"]}
    assert ("default", "10.88.0.1", "v0") in route4
    assert ("192.168.0.0/24", "10.88.0.9", "v0") in route4
    assert ("default", "fd00::1", "v0") in {
        (r["dst"], r.get("gateway"), r["dev"]) for r in got["route6"]
    }
    assert len([r for r in got["route4"] if r["dst"] == "default"]) == 1  # replaced, not added
    # the kernel's refusal comes back as the agent's error, in ip(8)'s words
    assert got["error"].startswith("route replace 0.0.0.0/0 via 172.31.0.1 dev v0: ")
