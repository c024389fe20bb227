"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.

systemd starts a ``Type=notify`` unit with NOTIFY_SOCKET set and waits for ``READY=1``
before it counts the unit as started (and before units ordered after it, kubelet, start).
Outside systemd the variable is unset and every call is a no-op.

The variable is taken out of criv's environment (as sd_notify's ``unset_environment``
does): processes criv starts must not inherit it. crun, for one, then sets up
notify-socket forwarding for each container and fails to start them.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("criv.sdnotify")


class Notifier:
    def __init__(self, address: str) -> None:
        self.address = address

    @classmethod
    def from_environ(cls) -> Notifier:
        return cls(os.environ.pop("NOTIFY_SOCKET", ""))

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` ("READY=1", "STATUS=...") to systemd; False where there is none."""
        addr = self.address
        if not addr:
            return False
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        elif not addr.startswith("/"):
            log.warning("NOTIFY_SOCKET %r is neither a path nor abstract; not notifying", addr)
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(addr)
                s.sendall("\n".join(fields).encode())
        except OSError as e:
            # a lost notification is systemd's start timeout, not a reason to stop serving
            log.warning("sd_notify to %s failed: %s", self.address, e)
            return False
        return True
