"""vhost-user messages, and the front end driven by a fake QEMU over a socketpair."""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from criv.vsock import packet as P
from criv.vsock import protocol as V
from criv.vsock.device import VsockDevice
from criv.vsock.eventloop import Loop
from criv.vsock.vhostuser import FEATURES, PROTOCOL_FEATURES, VhostUserFrontend
from criv.vsock.virtqueue import DESC, DESC_F_WRITE


def send(
    sock: socket.socket,
    req: int,
    payload: bytes = b"",
    fds: list[int] | None = None,
    need_reply: bool = False,
) -> None:
    flags = V.VERSION | (V.FLAG_NEED_REPLY if need_reply else 0)
    data = V.HEADER.pack(req, flags, len(payload)) + payload
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([data], anc)


def reply(sock: socket.socket) -> tuple[int, bytes]:
    req, flags, size = V.HEADER.unpack(sock.recv(V.HEADER.size))
    assert flags & V.FLAG_REPLY
    return req, sock.recv(size) if size else b""


def test_header_roundtrip_and_checks() -> None:
    data = V.encode(V.Request.GET_FEATURES, V.U64.pack(5))
    req, flags, size = V.decode_header(data[:12])
    assert (req, flags & V.FLAG_REPLY, size) == (1, V.FLAG_REPLY, 8)
    with pytest.raises(V.ProtocolError, match="version"):
        V.decode_header(V.HEADER.pack(1, 2, 0))
    with pytest.raises(V.ProtocolError, match="too large"):
        V.decode_header(V.HEADER.pack(1, 1, 1 << 20))


def test_parse_payloads() -> None:
    regions = (
        V.MEM_HEADER.pack(2, 0)
        + V.MEM_REGION.pack(0, 4096, 0x7000, 0)
        + V.MEM_REGION.pack(0x100000, 8192, 0x9000, 4096)
    )
    got = V.parse_mem_table(regions)
    assert got[1] == V.MemRegion(0x100000, 8192, 0x9000, 4096)
    with pytest.raises(V.ProtocolError):
        V.parse_mem_table(V.MEM_HEADER.pack(9, 0))
    with pytest.raises(V.ProtocolError):
        V.parse_mem_table(V.MEM_HEADER.pack(2, 0))
    addr = V.parse_vring_addr(V.VRING_ADDR.pack(1, 0, 10, 20, 30, 0))
    assert (addr.index, addr.desc, addr.used, addr.avail) == (1, 10, 20, 30)
    assert V.parse_config(V.CONFIG_HEADER.pack(0, 8, 0)) == (0, 8, 0)
    m = V.Message(V.Request.SET_VRING_NUM, 1, V.VRING_STATE.pack(1, 128))
    assert m.vring_state() == (1, 128) and m.name() == "SET_VRING_NUM"
    with pytest.raises(V.ProtocolError):
        V.Message(99, 1, b"").u64()


def test_recv_message_with_fds() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    send(a, V.Request.SET_VRING_KICK, V.U64.pack(1), [w])
    msg = V.recv_message(b)
    assert msg is not None and msg.request == V.Request.SET_VRING_KICK and len(msg.fds) == 1
    os.write(msg.fds[0], b"x")
    assert os.read(r, 1) == b"x"
    for fd in (r, w, *msg.fds):
        os.close(fd)
    a.close()
    assert V.recv_message(b) is None


@pytest.fixture
def qemu() -> Iterator[tuple[socket.socket, VhostUserFrontend, Loop, list[bool]]]:
    a, b = socket.socketpair()
    loop = Loop()
    dev = VsockDevice(loop, 42, "/nonexistent/vsock")
    gone: list[bool] = []
    fe = VhostUserFrontend(loop, dev, lambda: gone.append(True))
    fe.attach(b)
    a.settimeout(5)
    yield a, fe, loop, gone
    fe.close()
    a.close()
    loop.close()


def test_negotiation_and_config(
    qemu: tuple[socket.socket, VhostUserFrontend, Loop, list[bool]],
) -> None:
    q, _fe, loop, _ = qemu
    send(q, V.Request.GET_FEATURES)
    loop.run_once(1)
    assert reply(q) == (V.Request.GET_FEATURES, V.U64.pack(FEATURES))
    send(q, V.Request.GET_PROTOCOL_FEATURES)
    loop.run_once(1)
    assert reply(q) == (V.Request.GET_PROTOCOL_FEATURES, V.U64.pack(PROTOCOL_FEATURES))
    send(q, V.Request.SET_PROTOCOL_FEATURES, V.U64.pack(PROTOCOL_FEATURES))
    loop.run_once(1)
    send(q, V.Request.SET_OWNER, need_reply=True)
    loop.run_once(1)
    assert reply(q) == (V.Request.SET_OWNER, V.U64.pack(0))  # REPLY_ACK
    send(q, V.Request.GET_CONFIG, V.CONFIG_HEADER.pack(0, 8, 0) + bytes(8))
    loop.run_once(1)
    _req, payload = reply(q)
    assert payload == V.CONFIG_HEADER.pack(0, 8, 0) + struct.pack("<Q", 42)
    send(q, 77, need_reply=True)  # unknown request: failure ack, no crash
    loop.run_once(1)
    assert reply(q) == (77, V.U64.pack(1))


def test_full_device_start_over_memfd(
    qemu: tuple[socket.socket, VhostUserFrontend, Loop, list[bool]],
) -> None:
    """SET_MEM_TABLE with a memfd, vring setup, a guest REQUEST on tx, RST back on rx."""
    q, _fe, loop, gone = qemu
    size = 1 << 20
    gpa, uva = 0x40000000, 0x7F1234560000
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    mem = mmap.mmap(fd, size)
    send(
        q,
        V.Request.SET_MEM_TABLE,
        V.MEM_HEADER.pack(1, 0) + V.MEM_REGION.pack(gpa, size, uva, 0),
        [fd],
    )
    os.close(fd)
    num = 8
    layout = {}
    for i, base in ((0, 0x1000), (1, 0x3000)):
        desc, avail, used = base, base + 16 * num, base + 0x800
        layout[i] = (desc, avail, used)
        send(q, V.Request.SET_VRING_NUM, V.VRING_STATE.pack(i, num))
        send(q, V.Request.SET_VRING_BASE, V.VRING_STATE.pack(i, 0))
        send(
            q,
            V.Request.SET_VRING_ADDR,
            V.VRING_ADDR.pack(i, 0, uva + desc, uva + used, uva + avail, 0),
        )
    # rx: one buffer; tx: one REQUEST packet to host port 9 (nobody there -> RST)
    rx_desc, rx_avail, _ = layout[0]
    mem[rx_desc : rx_desc + 16] = DESC.pack(gpa + 0x10000, 4096, DESC_F_WRITE, 0)
    mem[rx_avail + 2 : rx_avail + 6] = struct.pack("<HH", 1, 0)
    tx_desc, tx_avail, tx_used = layout[1]
    pkt = P.Header(42, 2, 5000, 9, 0, P.TYPE_STREAM, P.OP_REQUEST, 0, 4096, 0).pack()
    mem[0x20000 : 0x20000 + len(pkt)] = pkt
    mem[tx_desc : tx_desc + 16] = DESC.pack(gpa + 0x20000, len(pkt), 0, 0)
    mem[tx_avail + 2 : tx_avail + 6] = struct.pack("<HH", 1, 0)
    kicks, calls = [], []
    for i in (0, 1):
        k, c = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        kicks.append(k)
        calls.append(c)
        send(q, V.Request.SET_VRING_CALL, V.U64.pack(i), [c])
        send(q, V.Request.SET_VRING_KICK, V.U64.pack(i), [k])
    for _ in range(20):
        loop.run_once(0.01)
    os.eventfd_write(kicks[1], 1)
    for _ in range(5):
        loop.run_once(0.01)
    assert struct.unpack_from("<H", mem, tx_used + 2)[0] == 1
    rst = P.Header.unpack(mem[0x10000 : 0x10000 + 44])
    assert (rst.op, rst.dst_cid, rst.dst_port, rst.src_port) == (P.OP_RST, 42, 5000, 9)
    assert os.eventfd_read(calls[0]) >= 1
    send(q, V.Request.GET_VRING_BASE, V.VRING_STATE.pack(1, 0))
    loop.run_once(1)
    assert reply(q) == (V.Request.GET_VRING_BASE, V.VRING_STATE.pack(1, 1))
    q.close()
    loop.run_once(1)
    assert gone == [True]
    for f in kicks + calls:
        os.close(f)
    mem.close()


def test_parsed_ring_and_memory_records_are_frozen() -> None:
    region = V.MemRegion(0x100000, 8192, 0x9000, 4096)
    with pytest.raises(AttributeError, match="frozen"):
        region.memory_size = 1 << 30
    addr = V.VringAddr(0, 0, 0x1000, 0x2000, 0x3000, 0)
    with pytest.raises(AttributeError, match="frozen"):
        addr.desc = 0
    assert {region: 1}[V.MemRegion(0x100000, 8192, 0x9000, 4096)] == 1  # hashable by value
