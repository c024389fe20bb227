"""virtio-vsock packet header (virtio spec 5.10.6, Linux include/uapi/linux/virtio_vsock.h)."""

from __future__ import annotations

import struct

from criv.vsock.record import Record

HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size  # 44

HOST_CID = 2
TYPE_STREAM = 1
TYPE_SEQPACKET = 2

OP_INVALID = 0
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
OP_NAMES = {
    0: "INVALID",
    1: "REQUEST",
    2: "RESPONSE",
    3: "RST",
    4: "SHUTDOWN",
    5: "RW",
    6: "CREDIT_UPDATE",
    7: "CREDIT_REQUEST",
}

SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

MAX_PKT_PAYLOAD = 64 * 1024  # VIRTIO_VSOCK_MAX_PKT_BUF_SIZE


class Header(Record):
    __slots__ = (
        "buf_alloc",
        "dst_cid",
        "dst_port",
        "flags",
        "fwd_cnt",
        "len",
        "op",
        "src_cid",
        "src_port",
        "type",
    )

    def __init__(
        self,
        src_cid: int,
        dst_cid: int,
        src_port: int,
        dst_port: int,
        len: int,
        type: int,
        op: int,
        flags: int,
        buf_alloc: int,
        fwd_cnt: int,
    ) -> None:
        self.src_cid = src_cid
        self.dst_cid = dst_cid
        self.src_port = src_port
        self.dst_port = dst_port
        self.len = len
        self.type = type
        self.op = op
        self.flags = flags
        self.buf_alloc = buf_alloc
        self.fwd_cnt = fwd_cnt

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Header:
        return cls(*HDR.unpack_from(data))

    def pack(self) -> bytes:
        return HDR.pack(
            self.src_cid,
            self.dst_cid,
            self.src_port,
            self.dst_port,
            self.len,
            self.type,
            self.op,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt,
        )

    def __str__(self) -> str:
        op = OP_NAMES.get(self.op, str(self.op))
        return (
            f"{op} {self.src_cid}:{self.src_port}->{self.dst_cid}:{self.dst_port} len={self.len}"
            f" flags={self.flags} buf_alloc={self.buf_alloc} fwd_cnt={self.fwd_cnt}"
        )
