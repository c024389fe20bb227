"""The guest's network for a ``vm`` pod, from SetupSandbox's ``network`` (what CNI set up on
the host for the pod): each NIC found by MAC (a minimal guest has no udev to name them),
given its MTU and addresses and brought up, then the routes. iproute2, as the host's CNI
plugins would do it in a netns; idempotent, so a repeated SetupSandbox changes nothing.
In a VM cloned from a template the NIC is hot-plugged after the clone resumes, so it may
appear a little after SetupSandbox arrives: :func:`find_nics` waits for it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

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


def _check_cidr(cidr: str) -> str:
    try:
        return str(ipaddress.ip_interface(cidr))
    except ValueError:
        raise InvalidArgument(f"bad address {cidr!r} (want CIDR)") from None


def commands(
    network: agent_pb2.GuestNetwork, nic_of: Callable[[str], str] = nic_by_mac
) -> list[list[str]]:
    """The ``ip -batch`` lines for a GuestNetwork message (pure, for tests). A route's
    family follows from its destination (no -4/-6: a batch line takes no options)."""
    cmds: list[list[str]] = []
    first = ""
    for iface in network.interfaces:
        dev = nic_of(iface.mac)
        first = first or dev
        if iface.mtu:
            cmds.append(["link", "set", "dev", dev, "mtu", str(int(iface.mtu))])
        cmds.append(["link", "set", "dev", dev, "up"])
        for addr in iface.addresses:
            cmds.append(["addr", "replace", _check_cidr(addr), "dev", dev])
    for r in network.routes:
        try:
            dst = str(ipaddress.ip_network(r.destination or "0.0.0.0/0", strict=False))
            gw = str(ipaddress.ip_address(r.gateway)) if r.gateway else ""
        except ValueError:
            raise InvalidArgument(f"bad route {r.destination!r} via {r.gateway!r}") from None
        cmd = ["route", "replace", dst]
        if gw:
            cmd += ["via", gw]
        if first:
            cmd += ["dev", first]
        cmds.append(cmd)
    return cmds


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
    lines = [" ".join(cmd) for cmd in commands(network, nic_of=nics.__getitem__)]
    if not lines:
        return
    # one ip process for all of them: each exec costs ~0.1 s under TCG. Every token is an
    # interface name from sysfs or a value parsed above: none holds a space or a newline.
    proc = await asyncio.create_subprocess_exec(
        "ip", "-batch", "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate("\n".join(lines).encode() + b"\n")
    if proc.returncode != 0:
        msg = out.decode(errors="replace").strip()
        raise RuntimeFailure(f"ip -batch ({'; '.join(lines)}): {msg}")
    log.info("guest network configured: %d interface(s)", len(network.interfaces))
