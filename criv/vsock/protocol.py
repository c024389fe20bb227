"""vhost-user wire protocol: message header, payload layouts and fd passing.

See QEMU docs/interop/vhost-user.rst.  Every message is a 12-byte header (request, flags,
size) followed by ``size`` payload bytes; file descriptors travel as SCM_RIGHTS ancillary data
on the same ``sendmsg``.
"""

from __future__ import annotations

import array
import contextlib
import enum
import socket
import struct

from criv.vsock.record import FrozenRecord, Record

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_HEADER = struct.Struct("<II")
MEM_REGION = struct.Struct("<QQQQ")
CONFIG_HEADER = struct.Struct("<III")

VERSION = 0x1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
MAX_PAYLOAD = 4096 + CONFIG_HEADER.size
MAX_FDS = 8
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

# virtio / vhost-user feature bits
F_VERSION_1 = 32
F_PROTOCOL_FEATURES = 30
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
# protocol feature bits
PF_MQ = 0
PF_REPLY_ACK = 3
PF_CONFIG = 9


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolError(Exception):
    """The peer sent something that is not valid vhost-user."""


class Message(Record):
    __slots__ = ("fds", "flags", "payload", "request")

    def __init__(
        self, request: int, flags: int, payload: bytes, fds: list[int] | None = None
    ) -> None:
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds: list[int] = [] if fds is None else fds

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"REQUEST_{self.request}"

    def u64(self) -> int:
        if len(self.payload) < U64.size:
            raise ProtocolError(f"{self.name()}: payload too short for u64")
        return int(U64.unpack_from(self.payload)[0])

    def vring_state(self) -> tuple[int, int]:
        if len(self.payload) < VRING_STATE.size:
            raise ProtocolError(f"{self.name()}: payload too short for vring state")
        index, num = VRING_STATE.unpack_from(self.payload)
        return int(index), int(num)


class VringAddr(FrozenRecord):
    __slots__ = ("avail", "desc", "flags", "index", "log", "used")

    def __init__(self, index: int, flags: int, desc: int, used: int, avail: int, log: int) -> None:
        self.index = index
        self.flags = flags
        self.desc = desc
        self.used = used
        self.avail = avail
        self.log = log


def parse_vring_addr(payload: bytes) -> VringAddr:
    if len(payload) < VRING_ADDR.size:
        raise ProtocolError("SET_VRING_ADDR: short payload")
    return VringAddr(*VRING_ADDR.unpack_from(payload))


class MemRegion(FrozenRecord):
    __slots__ = ("guest_phys_addr", "memory_size", "mmap_offset", "userspace_addr")

    def __init__(
        self, guest_phys_addr: int, memory_size: int, userspace_addr: int, mmap_offset: int
    ) -> None:
        self.guest_phys_addr = guest_phys_addr
        self.memory_size = memory_size
        self.userspace_addr = userspace_addr
        self.mmap_offset = mmap_offset


def parse_mem_table(payload: bytes) -> list[MemRegion]:
    if len(payload) < MEM_HEADER.size:
        raise ProtocolError("SET_MEM_TABLE: short payload")
    (n, _pad) = MEM_HEADER.unpack_from(payload)
    if n > MAX_FDS or len(payload) < MEM_HEADER.size + n * MEM_REGION.size:
        raise ProtocolError(f"SET_MEM_TABLE: bad region count {n}")
    return [
        MemRegion(*MEM_REGION.unpack_from(payload, MEM_HEADER.size + i * MEM_REGION.size))
        for i in range(n)
    ]


def parse_config(payload: bytes) -> tuple[int, int, int]:
    """(offset, size, flags) of a GET_CONFIG / SET_CONFIG request."""
    if len(payload) < CONFIG_HEADER.size:
        raise ProtocolError("GET_CONFIG: short payload")
    off, size, flags = CONFIG_HEADER.unpack_from(payload)
    return int(off), int(size), int(flags)


def encode(request: int, payload: bytes, *, reply: bool = True) -> bytes:
    flags = VERSION | (FLAG_REPLY if reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


def decode_header(data: bytes) -> tuple[int, int, int]:
    if len(data) != HEADER.size:
        raise ProtocolError("short header")
    request, flags, size = HEADER.unpack(data)
    if flags & 0x3 != VERSION:
        raise ProtocolError(f"unsupported vhost-user version in flags {flags:#x}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload size {size} too large")
    return int(request), int(flags), int(size)


def _close_all(fds: list[int]) -> None:
    import os

    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def recv_message(sock: socket.socket) -> Message | None:
    """Read one message (blocking).  None on orderly EOF."""
    fds = array.array("i")
    data, anc, _flags, _addr = sock.recvmsg(HEADER.size, socket.CMSG_LEN(MAX_FDS * fds.itemsize))
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    fdlist = list(fds)
    if not data:
        _close_all(fdlist)
        return None
    try:
        if len(data) < HEADER.size:
            data += _recv_exact(sock, HEADER.size - len(data))
        request, flags, size = decode_header(data)
        payload = _recv_exact(sock, size) if size else b""
    except Exception:
        _close_all(fdlist)
        raise
    return Message(request, flags, payload, fdlist)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProtocolError("connection closed inside a message")
        buf += chunk
    return bytes(buf)
