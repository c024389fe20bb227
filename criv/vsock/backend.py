"""Process main of the per-VM vhost-user-vsock backend (``python -m criv.vsock``).

Start it before QEMU.  It listens on ``--socket`` (QEMU's ``-chardev socket,path=...``),
creates the host-side sockets, prints one ``ready`` line on stdout (and writes
``--status-file``), serves exactly one QEMU connection and exits when QEMU disconnects.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from types import FrameType

from criv.vsock.connection import DEFAULT_BUF_ALLOC
from criv.vsock.device import VsockDevice
from criv.vsock.eventloop import Loop
from criv.vsock.host import HostListeners, listen_unix, port_socket_path
from criv.vsock.hostwrite import DEFAULT_MAX_BUFFERED
from criv.vsock.logcap import DEFAULT_LOG_MAX_BYTES, CappedStreamHandler
from criv.vsock.vhostuser import VhostUserFrontend
from criv.vsock.virtqueue import VirtQueue

log = logging.getLogger("criv.vsock")
STATUS_INTERVAL = 5.0


def rss_kib() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        return -1


def parse_listen_port(spec: str, uds: str) -> tuple[int, str]:
    """``P`` or ``P:PATH``."""
    port, _, path = spec.partition(":")
    return int(port), path or port_socket_path(uds, int(port))


class CountingDevice(VsockDevice):
    """The device, counting its resets for the status file (criv's metrics): each time
    its last running queue stops (guest reboot or driver reset, QEMU gone), every open
    stream is closed."""

    resets = 0

    def stop_queue(self, index: int) -> VirtQueue | None:
        vq = super().stop_queue(index)
        if vq is not None and not self.queues:
            self.resets += 1
        return vq


class Backend:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = Loop()
        self.device = CountingDevice(
            self.loop,
            args.guest_cid,
            args.uds,
            buf_alloc=args.buf_alloc,
            max_buffered=args.max_buffered,
        )
        ports = dict(parse_listen_port(p, args.uds) for p in args.listen_port)
        self.listener = listen_unix(args.socket, backlog=1)
        self.host = HostListeners(self.loop, self.device, args.uds, ports)
        self.frontend = VhostUserFrontend(self.loop, self.device, self._qemu_gone)
        self.loop.set(self.listener.fileno(), self._accept)
        self.started = time.monotonic()
        self.exit_reason = "running"

    def _accept(self) -> None:
        try:
            c, _ = self.listener.accept()
        except BlockingIOError:
            return
        log.info("QEMU connected")
        self.loop.drop(self.listener.fileno())
        self.listener.close()
        self.frontend.attach(c)

    def _qemu_gone(self) -> None:
        self.exit_reason = "qemu disconnected"
        self.loop.stopped = True

    def status(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "rss_kib": rss_kib(),
            "state": self.exit_reason,
            "broken": self.device.broken,
            "connections": len(self.device.conns),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "device_resets": self.device.resets,
            "buffered": self.device.writer.buffered,
            "stalled": self.device.monitor.stalled(),
            **self.device.stats,
        }

    def write_status(self) -> None:
        path = self.args.status_file
        if path:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.status(), f)
            os.replace(tmp, path)

    def _periodic(self) -> None:
        self.write_status()
        self.loop.call_later(STATUS_INTERVAL, self._periodic)

    def dump(self) -> None:
        """SIGUSR1: log the device and every connection (debugging aid)."""
        dev = self.device
        log.warning("state: %s %s", json.dumps(self.status()), dev.rings())
        for conn in dev.conns.values():
            log.warning("  %r stalled=%s %s", conn, conn.stalled, conn.counters())

    def run(self) -> None:
        self.write_status()
        print(f"criv-vsock: ready pid={os.getpid()} rss_kib={rss_kib()}", flush=True)
        self.loop.call_later(STATUS_INTERVAL, self._periodic)
        try:
            self.loop.run()
        finally:
            log.info(
                "exiting (%s), rss %d KiB, stats %s", self.exit_reason, rss_kib(), self.device.stats
            )
            self.frontend.close()
            self.device.reset_all("exiting")
            self.host.close()
            if self.listener.fileno() >= 0:
                self.listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.args.socket)
            self.write_status()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m criv.vsock", description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True, help="vhost-user socket QEMU connects to")
    ap.add_argument("--uds", required=True, help="hybrid-vsock socket path (host side)")
    ap.add_argument("--guest-cid", type=int, required=True)
    ap.add_argument(
        "--listen-port",
        action="append",
        default=[],
        metavar="P[:PATH]",
        help="also listen on PATH (default <uds>.P); connections go to guest port P",
    )
    ap.add_argument("--buf-alloc", type=int, default=DEFAULT_BUF_ALLOC, help=argparse.SUPPRESS)
    ap.add_argument(
        "--max-buffered",
        type=int,
        default=DEFAULT_MAX_BUFFERED,
        help="bytes held for slow host readers, all streams together (past it: RST)",
    )
    ap.add_argument(
        "--log-max-bytes",
        type=int,
        default=DEFAULT_LOG_MAX_BYTES,
        help="when stderr is a file, keep it under this size",
    )
    ap.add_argument("--status-file", help="JSON status (pid, rss_kib, counters), refreshed")
    ap.add_argument("--log-level", default=os.environ.get("CRIV_VSOCK_LOG", "INFO"))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = CappedStreamHandler(sys.stderr, args.log_max_bytes)
    handler.setFormatter(
        logging.Formatter(
            f"criv-vsock[{os.getpid()}] cid={args.guest_cid} %(levelname)s %(message)s"
        )
    )
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    if args.guest_cid < 3 or args.guest_cid >= 0xFFFFFFFF:
        log.error("guest CID must be >= 3")
        return 2

    def _term(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        backend = Backend(args)
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    signal.signal(signal.SIGUSR1, lambda signum, frame: backend.dump())
    backend.run()
    return 0


__all__ = ["main", "socket"]
