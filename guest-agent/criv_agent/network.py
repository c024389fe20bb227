"""The guest's network for a ``vm`` pod, from SetupSandbox's ``network`` (what CNI set up on
the host for the pod): each NIC found by MAC (a minimal guest has no udev to name them),
given its MTU and addresses and brought up, then the routes: what ``ip`` would do, as the
host's CNI plugins do it in a netns, but sent as rtnetlink requests from the agent itself
(rtnetlink.py); idempotent, so a repeated SetupSandbox changes nothing.
In a VM cloned from a template the NIC is hot-plugged after the clone resumes, so it may
appear a little after SetupSandbox arrives: :func:`find_nics` waits for it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from criv_agent import rtnetlink
from criv_agent.errors import InvalidArgument, RuntimeFailure

if TYPE_CHECKING:
    from criv_agent.api.agent.v1 import agent_pb2

log = logging.getLogger(__name__)
SYS_NET = "/sys/class/net"
POLL = 0.01  # seconds between looks for a hot-plugged NIC (a listdir)


def nic_by_mac(mac: str, root: str = SYS_NET) -> str:
    want = mac.strip().lower()
    try:
        names = sorted(os.listdir(root))
    except OSError:
        names = []
    for name in names:
        try:
            with open(os.path.join(root, name, "address"), encoding="ascii") as f:
                if f.read().strip().lower() == want:
                    return name
        except OSError:
            continue
    raise InvalidArgument(f"no network interface with MAC {mac!r} in the guest")


class Step(NamedTuple):
    words: list[str]  # what it does, in ip(8)'s words: for the log and errors
    request: rtnetlink.Request


def _interface(cidr: str) -> rtnetlink.Interface:
    try:
        return ipaddress.ip_interface(cidr)
    except ValueError:
        raise InvalidArgument(f"bad address {cidr!r} (want CIDR)") from None


def commands(
    network: agent_pb2.GuestNetwork,
    nic_of: Callable[[str], str] = nic_by_mac,
    index_of: Callable[[str], int] = socket.if_nametoindex,
) -> list[Step]:
    """The steps for a GuestNetwork message, in order (pure, for tests): each NIC's MTU,
    up, its addresses; then the routes, on the first NIC."""
    steps: list[Step] = []
    first = ""
    for iface in network.interfaces:
        dev = nic_of(iface.mac)
        index = index_of(dev)
        first = first or dev
        if iface.mtu:
            mtu = int(iface.mtu)
            steps.append(
                Step(["link", "set", "dev", dev, "mtu", str(mtu)], rtnetlink.link_mtu(index, mtu))
            )
        steps.append(Step(["link", "set", "dev", dev, "up"], rtnetlink.link_up(index)))
        for addr in iface.addresses:
            ip = _interface(addr)
            steps.append(
                Step(["addr", "replace", str(ip), "dev", dev], rtnetlink.addr_replace(index, ip))
            )
    for r in network.routes:
        try:
            dst = ipaddress.ip_network(r.destination or "0.0.0.0/0", strict=False)
            gw = ipaddress.ip_address(r.gateway) if r.gateway else None
            req = rtnetlink.route_replace(dst, gw, index_of(first) if first else None)
        except ValueError:
            raise InvalidArgument(f"bad route {r.destination!r} via {r.gateway!r}") from None
        words = ["route", "replace", str(dst)] + (["via", str(gw)] if gw else [])
        steps.append(Step(words + (["dev", first] if first else []), req))
    return steps


async def find_nics(
    network: agent_pb2.GuestNetwork, wait_seconds: float = 0.0, root: str = SYS_NET
) -> dict[str, str]:
    """MAC -> interface name for every interface of ``network``, waiting up to
    ``wait_seconds`` for NICs still being hot-plugged (a VM cloned from a template)."""
    until = time.monotonic() + wait_seconds
    while True:
        try:
            return {i.mac: nic_by_mac(i.mac, root) for i in network.interfaces}
        except InvalidArgument as e:
            if time.monotonic() >= until:
                if wait_seconds > 0:
                    raise InvalidArgument(f"{e} after waiting {wait_seconds:.1f} s") from None
                raise
        await asyncio.sleep(POLL)


async def apply(network: agent_pb2.GuestNetwork, wait_seconds: float = 0.0) -> None:
    """Configure ``network``; its NICs may take up to ``wait_seconds`` to appear."""
    nics = await find_nics(network, wait_seconds)
    try:
        steps = commands(network, nic_of=nics.__getitem__)
    except OSError as e:  # an interface found by MAC went away before its index was read
        raise RuntimeFailure(f"guest network: {e}") from None
    if not steps:
        return
    with rtnetlink.RtNetlink() as nl:
        for step in steps:
            try:
                nl.call(step.request)
            except OSError as e:
                raise RuntimeFailure(f"{' '.join(step.words)}: {e.strerror or e}") from None
    log.info("guest network configured: %d interface(s)", len(network.interfaces))
