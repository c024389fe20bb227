"""The vhost-user front end: QEMU's control connection (one per backend process).

Handles feature and protocol-feature negotiation, SET_OWNER, SET_MEM_TABLE, the vring setup
messages, GET_VRING_BASE (stop), SET_VRING_ENABLE and GET_CONFIG (guest_cid), and hands running
virtqueues to the ``VsockDevice``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable

from criv.vsock import protocol as V
from criv.vsock.device import VsockDevice
from criv.vsock.eventloop import Loop
from criv.vsock.memory import MemoryMap
from criv.vsock.record import Record
from criv.vsock.virtqueue import VirtQueue, VirtQueueError

log = logging.getLogger("criv.vsock")

FEATURES = (1 << V.F_VERSION_1) | (1 << V.F_PROTOCOL_FEATURES)
PROTOCOL_FEATURES = (1 << V.PF_CONFIG) | (1 << V.PF_REPLY_ACK)
NUM_QUEUES = 2


class Vring(Record):
    __slots__ = ("addr", "base", "enabled", "kick", "num", "queue")

    def __init__(self) -> None:
        self.num = 0
        self.base = 0
        self.addr: V.VringAddr | None = None
        self.kick: int | None = None
        self.enabled = True
        self.queue: VirtQueue | None = None


class VhostUserFrontend:
    def __init__(self, loop: Loop, device: VsockDevice, on_disconnect: Callable[[], None]) -> None:
        self.loop = loop
        self.device = device
        self.on_disconnect = on_disconnect
        self.sock: socket.socket | None = None
        self.features = 0
        self.protocol_features = 0
        self.mem: MemoryMap | None = None
        self.vrings = [Vring() for _ in range(3)]
        self.handlers: dict[int, Callable[[V.Message], bytes | None]] = {
            V.Request.GET_FEATURES: lambda m: V.U64.pack(FEATURES),
            V.Request.SET_FEATURES: self._set_features,
            V.Request.SET_OWNER: lambda m: None,
            V.Request.RESET_OWNER: lambda m: None,
            V.Request.GET_PROTOCOL_FEATURES: lambda m: V.U64.pack(PROTOCOL_FEATURES),
            V.Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            V.Request.GET_QUEUE_NUM: lambda m: V.U64.pack(NUM_QUEUES),
            V.Request.SET_MEM_TABLE: self._set_mem_table,
            V.Request.SET_VRING_NUM: self._set_vring_num,
            V.Request.SET_VRING_BASE: self._set_vring_base,
            V.Request.SET_VRING_ADDR: self._set_vring_addr,
            V.Request.SET_VRING_KICK: self._set_vring_kick,
            V.Request.SET_VRING_CALL: self._set_vring_call,
            V.Request.SET_VRING_ERR: self._set_vring_err,
            V.Request.GET_VRING_BASE: self._get_vring_base,
            V.Request.SET_VRING_ENABLE: self._set_vring_enable,
            V.Request.GET_CONFIG: self._get_config,
            V.Request.SET_CONFIG: lambda m: None,
        }

    def attach(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(True)
        self.loop.set(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self.sock is not None
        try:
            msg = V.recv_message(self.sock)
        except (OSError, V.ProtocolError) as e:
            log.error("vhost-user connection failed: %s", e)
            msg = None
        if msg is None:
            log.info("QEMU disconnected")
            self.close()
            self.on_disconnect()
            return
        self.handle(msg)

    def handle(self, msg: V.Message) -> None:
        handler = self.handlers.get(msg.request)
        ok = True
        reply: bytes | None = None
        if handler is None:
            log.warning("unsupported vhost-user request %s", msg.name())
            ok = False
        else:
            try:
                reply = handler(msg)
            except (V.ProtocolError, VirtQueueError, ValueError, OSError) as e:
                log.error("%s failed: %s", msg.name(), e)
                ok = False
        for fd in msg.fds:  # handlers take the fds they keep out of the list
            os.close(fd)
        if reply is not None:
            self._send(msg.request, reply)
        elif msg.need_reply and self.protocol_features & (1 << V.PF_REPLY_ACK):
            self._send(msg.request, V.U64.pack(0 if ok else 1))

    def _send(self, request: int, payload: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(V.encode(request, payload))

    # -- handlers -------------------------------------------------------------------------
    def _set_features(self, m: V.Message) -> None:
        self.features = m.u64()
        log.debug("features %#x", self.features)

    def _set_protocol_features(self, m: V.Message) -> None:
        self.protocol_features = m.u64() & PROTOCOL_FEATURES

    def _set_mem_table(self, m: V.Message) -> None:
        regions = V.parse_mem_table(m.payload)
        fds, m.fds = m.fds, []
        new = MemoryMap.from_fds(regions, fds)
        log.info(
            "memory table: %s",
            ", ".join(f"{r.guest_phys_addr:#x}+{r.memory_size:#x}" for r in regions),
        )
        old, self.mem = self.mem, new
        for i, vr in enumerate(self.vrings):  # remap running rings
            if vr.queue is not None:
                q = vr.queue
                self._start(i)
                if vr.queue is not None:
                    vr.queue.last_avail = q.last_avail
                    vr.queue.used_idx = q.used_idx
        if old is not None:
            old.close()

    def _vring(self, index: int) -> Vring:
        if index >= len(self.vrings):
            raise V.ProtocolError(f"vring index {index} out of range")
        return self.vrings[index]

    def _set_vring_num(self, m: V.Message) -> None:
        index, num = m.vring_state()
        self._vring(index).num = num

    def _set_vring_base(self, m: V.Message) -> None:
        index, num = m.vring_state()
        self._vring(index).base = num & 0xFFFF

    def _set_vring_addr(self, m: V.Message) -> None:
        addr = V.parse_vring_addr(m.payload)
        self._vring(addr.index).addr = addr

    def _set_vring_enable(self, m: V.Message) -> None:
        index, num = m.vring_state()
        vr = self._vring(index)
        vr.enabled = bool(num)
        if vr.enabled and vr.queue is not None:
            self.device.kick(index)

    def _take_fd(self, m: V.Message) -> tuple[int, int | None]:
        val = m.u64()
        index = val & V.VRING_IDX_MASK
        if val & V.VRING_NOFD_MASK or not m.fds:
            return index, None
        return index, m.fds.pop(0)

    def _set_vring_kick(self, m: V.Message) -> None:
        index, fd = self._take_fd(m)
        vr = self._vring(index)
        self._drop_kick(vr)
        if fd is None:
            raise V.ProtocolError("polling mode (no kick fd) is not supported")
        vr.kick = fd
        os.set_blocking(fd, False)
        self.loop.set(fd, lambda: self._kicked(index))
        self._start(index)

    def _start(self, index: int) -> None:
        vr = self.vrings[index]
        if index >= NUM_QUEUES or vr.addr is None or self.mem is None or vr.kick is None:
            return
        a = vr.addr
        try:
            vr.queue = VirtQueue(self.mem, vr.num, a.desc, a.avail, a.used)
        except VirtQueueError as e:
            vr.queue = None
            self.device.mark_broken(f"vring {index}: {e}")
            return
        vr.queue.last_avail = vr.base
        log.info("vring %d started: num=%d base=%d", index, vr.num, vr.base)
        self.device.start_queue(index, vr.queue)

    def _kicked(self, index: int) -> None:
        vr = self.vrings[index]
        if vr.kick is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.read(vr.kick, 8)
        if vr.enabled and vr.queue is not None:
            self.device.kick(index)

    def _drop_kick(self, vr: Vring) -> None:
        if vr.kick is not None:
            self.loop.drop(vr.kick)
            os.close(vr.kick)
            vr.kick = None

    def _set_vring_call(self, m: V.Message) -> None:
        index, fd = self._take_fd(m)
        self._vring(index)
        self.device.set_call(index, fd)

    def _set_vring_err(self, m: V.Message) -> None:
        _index, fd = self._take_fd(m)
        if fd is not None:
            os.close(fd)

    def _get_vring_base(self, m: V.Message) -> bytes:
        index, _ = m.vring_state()
        vr = self._vring(index)
        self._drop_kick(vr)
        base = vr.queue.last_avail if vr.queue is not None else vr.base
        vr.queue = None
        vr.base = base
        self.device.stop_queue(index)
        log.info("vring %d stopped at %d", index, base)
        return V.VRING_STATE.pack(index, base)

    def _get_config(self, m: V.Message) -> bytes:
        off, size, flags = V.parse_config(m.payload)
        cfg = struct.pack("<Q", self.device.guest_cid)
        data = cfg[off : off + size].ljust(size, b"\0")
        return V.CONFIG_HEADER.pack(off, size, flags) + data

    def close(self) -> None:
        for vr in self.vrings:
            self._drop_kick(vr)
            vr.queue = None
        for i in range(NUM_QUEUES):
            self.device.stop_queue(i)
            self.device.set_call(i, None)
        if self.sock is not None:
            self.loop.drop(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if self.mem is not None:
            self.mem.close()
            self.mem = None
