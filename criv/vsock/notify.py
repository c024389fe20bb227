"""Interrupts to the guest driver (the vrings' call eventfds), coalesced.

An rx interrupt goes out once per event-loop turn that put packets in the rx ring: the driver
is waiting for them.  A tx interrupt only lets the driver free the buffers of packets it has
sent (Linux 6.1's ``virtio_transport_tx_work``), so it is held back until the driver has
``num // TX_SIGNAL_FRACTION`` descriptors waiting to be freed or ``TX_SIGNAL_DELAY`` has
passed: the driver always has most of its tx ring free, and a small round trip costs the guest
one interrupt instead of two.  Under TCG an interrupt costs QEMU's main loop a wake-up and
the vCPU an exit, an IRQ and a work item, which is as much as the packet itself.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # as typing.TYPE_CHECKING; the backend does not import typing
if TYPE_CHECKING:
    from criv.vsock.device import VsockDevice

RX, TX = 0, 1
RESIGNAL_AFTER = 0.25
TX_SIGNAL_DELAY = 0.001
TX_SIGNAL_FRACTION = 4
_ONE = (1).to_bytes(8, "little")


class Interrupts:
    def __init__(self, dev: VsockDevice) -> None:
        self.dev = dev
        self.calls: dict[int, int] = {}
        self.signal = [False, False]  # used entries pushed since the last interrupt
        self.held = [False, False]  # an interrupt the driver had switched off
        self.tx_unsignalled = 0  # tx descriptors used since the last tx interrupt
        self._resignal: int | None = None
        self._tx_timer: int | None = None

    def set_call(self, index: int, fd: int | None) -> None:
        old = self.calls.pop(index, None)
        if old is not None:
            os.close(old)
        if fd is not None:
            self.calls[index] = fd

    def tx_used(self, descriptors: int) -> None:
        self.tx_unsignalled += descriptors
        self.signal[TX] = True

    def flush(self) -> None:
        """Once per event-loop turn: send what this turn's work calls for."""
        signal = self.signal
        if signal[RX]:
            signal[RX] = False
            self.interrupt(RX)
        if signal[TX]:
            vq = self.dev.queues.get(TX)
            if vq is not None and self.tx_unsignalled < vq.num // TX_SIGNAL_FRACTION:
                if self._tx_timer is None:
                    self._tx_timer = self.dev.loop.call_later(TX_SIGNAL_DELAY, self._tx_due)
                return
            self._signal_tx()

    def _tx_due(self) -> None:
        self._tx_timer = None
        if self.signal[TX]:
            self._signal_tx()

    def _signal_tx(self) -> None:
        self.signal[TX] = False
        self.tx_unsignalled = 0
        self.interrupt(TX)

    def interrupt(self, index: int) -> bool:
        """Interrupt the driver unless it switched interrupts off (it is polling the ring
        then, and looks at it once more when it switches them back on)."""
        vq, fd = self.dev.queues.get(index), self.calls.get(index)
        if vq is None or fd is None:
            return False
        if vq.needs_interrupt():
            os.write(fd, _ONE)
            self.held[index] = False
            return True
        # Under single-vCPU TCG the driver's "enable, then look again" is not ordered against
        # our "push, then read the flag" (TCG emits no host fence), so both can miss the
        # other: look at the flag again shortly.
        self.held[index] = True
        if self._resignal is None:
            self._resignal = self.dev.loop.call_later(RESIGNAL_AFTER, self._recheck_held)
        return False

    def _recheck_held(self) -> None:
        self._resignal = None
        for index in (RX, TX):
            if self.held[index] and self.interrupt(index):
                self.dev.stats["interrupts_resent"] += 1
