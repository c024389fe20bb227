"""A ``vm`` pod's tap: the VM's NIC joined to the pod's CNI veth with tc mirroring.

CNI sets up ``eth0`` in the pod netns as for any pod. The VM gets a tap there, and two tc
ingress filters (u32 match-all, ``mirred egress redirect``) pass every frame from eth0 to
the tap and back, so the guest NIC, which has eth0's MAC, takes the pod IP: the host side
sees exactly the pod CNI made. libvirt opens a tap only in its own network namespace, so
the tap is created in the host netns, handed to the domain (``managed='no'``), and moved
into the pod netns once QEMU holds it; QEMU keeps working across the move.

Taps are named ``crivt`` + the first 10 characters of the sandbox id (15 bytes: IFNAMSIZ).
A tap only lives in the host netns between its creation and the move (about a second); one
left there by a crash is collected at start (:func:`host_taps`). Its ifalias names the criv
that made it (its state dir), so one criv never collects another's tap mid-boot.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from criv.commands import run_command
from criv.errors import Internal

log = logging.getLogger("criv.network.tap")

TAP_PREFIX = "crivt"
IFALIAS_MAX = 255
POD_IFNAME = "eth0"


def tap_name(sandbox_id: str) -> str:
    return TAP_PREFIX + sandbox_id[:10]


async def _check(*argv: str, stdin: bytes = b"") -> str:
    rc, out = await run_command(*argv, stdin=stdin)
    if rc != 0:
        raise Internal(f"{' '.join(argv)}: {out}")
    return out


def _in_ns(netns: Path, *argv: str) -> list[str]:
    return ["nsenter", f"--net={netns}", *argv]


@dataclass(frozen=True)
class PodLink:
    """The pod's CNI interface as the guest NIC must copy it."""

    mac: str
    mtu: int


async def pod_link(netns: Path, ifname: str = POD_IFNAME) -> PodLink:
    out = await _check(*_in_ns(netns, "ip", "-j", "link", "show", "dev", ifname))
    try:
        link = json.loads(out)[0]
        return PodLink(str(link["address"]), int(link.get("mtu", 0)))
    except (ValueError, LookupError, TypeError) as e:
        raise Internal(f"cannot read {ifname} in {netns}: {e}: {out[:200]}") from e


async def create_tap(name: str, owner: str) -> None:
    """A tap in the host netns, for libvirt to open (replacing a stale one of that name)."""
    await delete_tap(name)
    await _check("ip", "tuntap", "add", "dev", name, "mode", "tap")
    await _check("ip", "link", "set", "dev", name, "alias", owner[:IFALIAS_MAX])


async def delete_tap(name: str) -> None:
    """Delete the tap from the host netns; a missing tap is success (it may have moved
    into the pod netns, which takes it along when it goes)."""
    await run_command("ip", "link", "del", "dev", name)


async def attach_tap(netns: Path, tap: str, ifname: str = POD_IFNAME) -> None:
    """Move ``tap`` (already opened by QEMU) into the pod netns and mirror it with eth0:
    two processes (``ip`` moves it and sets it up in one request, one ``tc -batch``)."""
    await _check("ip", "link", "set", "dev", tap, "netns", str(netns), "up")
    batch = []
    for dev, peer in ((ifname, tap), (tap, ifname)):
        batch += [
            f"qdisc replace dev {dev} ingress",
            f"filter replace dev {dev} parent ffff: protocol all u32 match u32 0 0 "
            f"action mirred egress redirect dev {peer}",
        ]
    await _check(*_in_ns(netns), "tc", "-batch", "-", stdin="\n".join(batch).encode() + b"\n")


def host_taps(owner: str) -> list[str]:
    """``owner``'s taps in the host netns (only ones that never reached a pod netns)."""
    out = []
    with contextlib.suppress(OSError):
        for p in Path("/sys/class/net").iterdir():
            if _is_criv_tap(p.name):
                with contextlib.suppress(OSError):
                    if (p / "ifalias").read_text().strip() == owner[:IFALIAS_MAX]:
                        out.append(p.name)
    return sorted(out)


def _is_criv_tap(name: str) -> bool:
    return name.startswith(TAP_PREFIX) and len(name) == len(TAP_PREFIX) + 10


def guest_addressing(
    result: dict[str, Any], ifname: str = POD_IFNAME
) -> tuple[list[str], list[tuple[str, str]]]:
    """(addresses as CIDR, routes as (destination, gateway)) for the guest from a CNI
    result: the sandbox interface's ``ips`` and the result's ``routes``; a route without a
    ``gw`` goes via the gateway of the interface's address of the same family (what the
    bridge/host-local plugins install in a netns)."""
    ifs = result.get("interfaces")
    interfaces = ifs if isinstance(ifs, list) else []
    addresses: list[str] = []
    gateways: dict[int, str] = {}
    for entry in result.get("ips") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
            continue
        idx = entry.get("interface")
        if isinstance(idx, int) and 0 <= idx < len(interfaces):
            iface = interfaces[idx]
            if isinstance(iface, dict) and (
                not iface.get("sandbox") or iface.get("name") != ifname
            ):
                continue
        try:
            addr = ipaddress.ip_interface(entry["address"])
        except ValueError:
            continue
        addresses.append(str(addr))
        gw = entry.get("gateway")
        if isinstance(gw, str) and gw:
            gateways.setdefault(addr.version, gw)
    routes: list[tuple[str, str]] = []
    for r in result.get("routes") or []:
        if not isinstance(r, dict) or not isinstance(r.get("dst"), str):
            continue
        try:
            dst = ipaddress.ip_network(r["dst"], strict=False)
        except ValueError:
            continue
        gw = r.get("gw") if isinstance(r.get("gw"), str) else ""
        routes.append((str(dst), gw or gateways.get(dst.version, "")))
    return addresses, routes
