"""The few rtnetlink requests the guest's network needs (Linux ``rtnetlink(7)``).

What ``ip link set``, ``ip addr replace`` and ``ip route replace`` send, built here and
sent on one netlink socket: an ``ip`` process costs ~0.2 s of a cold guest's SetupSandbox
under TCG (loading iproute2 and its libraries, all translated anew), these requests a few
milliseconds. Builders are pure (tests decode them); :class:`RtNetlink` sends one request
at a time and waits for the kernel's acknowledgement.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from typing import NamedTuple

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst/src length, tos, table, protocol, scope, type, flags
RTATTR = struct.Struct("=HH")  # length, type
ERRCODE = struct.Struct("=i")

NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3  # what ip(8) marks routes it adds with
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
REPLACE = NLM_F_CREATE | NLM_F_REPLACE

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Request(NamedTuple):
    type: int
    flags: int  # besides NLM_F_REQUEST | NLM_F_ACK, which every request carries
    body: bytes


def _attr(kind: int, data: bytes) -> bytes:
    length = RTATTR.size + len(data)
    return RTATTR.pack(length, kind) + data + bytes(-length % 4)


def _family(ip: Address | Interface | Network) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def link_get(index: int) -> Request:
    """``ip link show dev …``: reads only (the kernel answers with the link, then the ack)."""
    return Request(RTM_GETLINK, 0, IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0))


def link_mtu(index: int, mtu: int) -> Request:
    """``ip link set dev … mtu …``"""
    body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0) + _attr(
        IFLA_MTU, struct.pack("=I", mtu)
    )
    return Request(RTM_NEWLINK, 0, body)


def link_up(index: int) -> Request:
    """``ip link set dev … up``"""
    return Request(RTM_NEWLINK, 0, IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP))


def addr_replace(index: int, iface: Interface) -> Request:
    """``ip addr replace ADDR/LEN dev …``: the local address is also the peer, as ip(8)
    sends it when no peer is named."""
    ip = iface.ip.packed
    head = IFADDRMSG.pack(_family(iface), iface.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    return Request(RTM_NEWADDR, REPLACE, head + _attr(IFA_LOCAL, ip) + _attr(IFA_ADDRESS, ip))


def route_replace(dst: Network, gateway: Address | None, index: int | None) -> Request:
    """``ip route replace DST [via GW] [dev …]`` in the main table. An IPv4 route without
    a gateway is on the link (scope link), as ip(8) makes it."""
    if gateway is not None and gateway.version != dst.version:
        raise ValueError(f"route {dst} via {gateway}: not the same address family")
    on_link = gateway is None and dst.version == 4
    scope = RT_SCOPE_LINK if on_link else RT_SCOPE_UNIVERSE
    head = RTMSG.pack(
        _family(dst), dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0
    )
    attrs = b""
    if dst.prefixlen:
        attrs += _attr(RTA_DST, dst.network_address.packed)
    if gateway is not None:
        attrs += _attr(RTA_GATEWAY, gateway.packed)
    if index is not None:
        attrs += _attr(RTA_OIF, struct.pack("=i", index))
    return Request(RTM_NEWROUTE, REPLACE, head + attrs)


class RtNetlink:
    """A NETLINK_ROUTE socket of this network namespace."""

    TIMEOUT = 5.0  # the kernel answers at once; a socket that does not is broken

    def __init__(self) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        self.sock.settimeout(self.TIMEOUT)
        self.sock.bind((0, 0))
        self.seq = 0

    def __enter__(self) -> RtNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def call(self, req: Request) -> None:
        """Send ``req``; return on the kernel's acknowledgement, raise ``OSError`` with the
        kernel's error otherwise."""
        self.seq += 1
        length = NLMSGHDR.size + len(req.body)
        flags = NLM_F_REQUEST | NLM_F_ACK | req.flags
        self.sock.send(NLMSGHDR.pack(length, req.type, flags, self.seq, 0) + req.body)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + NLMSGHDR.size <= len(data):
                size, kind, _flags, seq, _port = NLMSGHDR.unpack_from(data, off)
                if size < NLMSGHDR.size:
                    raise OSError(f"rtnetlink: a message of {size} bytes")
                if kind == NLMSG_ERROR and seq == self.seq:
                    (err,) = ERRCODE.unpack_from(data, off + NLMSGHDR.size)
                    if err:
                        raise OSError(-err, os.strerror(-err))
                    return
                off += (size + 3) & ~3
