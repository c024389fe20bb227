#!/usr/bin/env python3
"""Benchmark criv's vhost-user-vsock backend against a TCG guest.

One run, one VM: throughput (MB/s, both directions) and small-message round-trip time through
  * vsock        -- criv's backend, hybrid-vsock unix socket on the host
  * vsock+splice -- the same behind criv.vsock.splice's forwarder (what grpcio would dial)
  * virtio-serial -- a virtio-serial port of the same VM (QEMU chardev socket)
  * unix         -- a plain host unix socket to a local process (no VM: the ceiling)
The guest side is tests/vm/vsock/guest/vsock-guest.c.

This machine's speed swings by tens of percent from one minute to the next, so the
transports take turns: ``--rounds`` rounds, each measuring every transport once, and the
table shows each figure's median over the rounds, with vsock's ratio to virtio-serial taken
within each round (then the median). Where the time went: the CPU the backend and QEMU
(its vCPU and main loop: the guest) spent per MiB or per round trip, from /proc.

Usage: python bench/vsock.py [--size MiB] [--rounds N] [--rtt-count N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from criv.procscan import cpu_ns  # noqa: E402
from criv.vsock.connector import hybrid_connect  # noqa: E402
from criv.vsock.splice import Forwarder  # noqa: E402
from tests.vm.vsock.vsockvm import GUEST_PORT, VM, read_line  # noqa: E402

MiB = 1 << 20
CHUNK = bytes(range(256)) * (MiB // 256)
Dial = Callable[[str], socket.socket]
# a transport's three figures: MB/s host->guest, MB/s guest->host, RTT in microseconds
FIGURES = ("host->guest MB/s", "guest->host MB/s", "RTT 64 B (us)")
Figures = tuple[float, float, float]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) so far."""
    ns = cpu_ns(pid)
    if ns is None:
        raise RuntimeError(f"process {pid} is gone")
    return ns / 1e9


class CpuMeter:
    """CPU seconds each watched process spends per phase, summed over the rounds."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.spent: dict[tuple[str, int], dict[str, float]] = {}

    @contextlib.contextmanager
    def phase(self, transport: str, figure: int) -> Iterator[None]:
        before = {name: cpu_s(pid) for name, pid in self.pids.items()}
        yield
        acc = self.spent.setdefault((transport, figure), {})
        for name, pid in self.pids.items():
            acc[name] = acc.get(name, 0.0) + cpu_s(pid) - before[name]


def recv_exact(s: socket.socket, n: int, buf: bytearray) -> None:
    view = memoryview(buf)
    got = 0
    while got < n:
        k = s.recv_into(view[: min(len(buf), n - got)])
        if not k:
            raise EOFError(f"EOF after {got} of {n} bytes")
        got += k


def send_n(s: socket.socket, n: int) -> None:
    left = n
    while left:
        k = min(left, len(CHUNK))
        s.sendall(CHUNK[:k])
        left -= k


def rtt_loop(s: socket.socket, count: int) -> float:
    """Median round trip of a 64-byte message, in microseconds."""
    msg = b"r" * 64
    buf = bytearray(64)
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        s.sendall(msg)
        recv_exact(s, 64, buf)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[count // 10 :]) * 1e6


# -- stream transports (vsock, vsock+splice, unix): one connection per command ------------------
def stream_bench(
    dial: Dial, n: int, count: int, phase: Callable[[int], contextlib.AbstractContextManager[None]]
) -> Figures:
    s = dial("DRAIN")
    with phase(0):
        t0 = time.perf_counter()
        send_n(s, n)
        s.shutdown(socket.SHUT_WR)
        line = read_line(s)
        up = n / (time.perf_counter() - t0) / 1e6
    assert int(line) == n, line
    s.close()
    s = dial(f"SOURCE {n} 1")
    buf = bytearray(MiB)
    with phase(1):
        t0 = time.perf_counter()
        recv_exact(s, n, buf)
        down = n / (time.perf_counter() - t0) / 1e6
    s.close()
    s = dial("RTT 64")
    with phase(2):
        rtt = rtt_loop(s, count)
    s.close()
    return up, down, rtt


def serial_bench(
    vm: VM, n: int, count: int, phase: Callable[[int], contextlib.AbstractContextManager[None]]
) -> Figures:
    assert vm.serial_sock is not None
    ser = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ser.connect(vm.serial_sock)
    ser.settimeout(120)
    ctl = vm.connect(f"SERIAL bench DRAIN {n}", timeout=120)
    assert read_line(ctl) == b"OPENED\n"
    with phase(0):
        t0 = time.perf_counter()
        send_n(ser, n)
        line = read_line(ctl)
        up = n / (time.perf_counter() - t0) / 1e6
    assert int(line) == n, line
    ctl.close()
    ctl = vm.connect(f"SERIAL bench SOURCE {n} 1", timeout=120)
    assert read_line(ctl) == b"OPENED\n"
    buf = bytearray(MiB)
    with phase(1):
        t0 = time.perf_counter()
        recv_exact(ser, n, buf)
        down = n / (time.perf_counter() - t0) / 1e6
    read_line(ctl)
    ctl.close()
    ctl = vm.connect(f"SERIAL bench RTT 64 {count}", timeout=120)
    assert read_line(ctl) == b"OPENED\n"
    with phase(2):
        rtt = rtt_loop(ser, count)
    ctl.close()
    ser.close()
    return up, down, rtt


# -- the plain unix-socket peer (a local process speaking the guest program's protocol) --------
def unix_peer(path: str) -> None:
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(8)
    print("ready", flush=True)

    def serve(c: socket.socket) -> None:
        cmd = read_line(c).split()
        buf = bytearray(MiB)
        if cmd[0] == b"DRAIN":
            total = 0
            while k := c.recv_into(buf):
                total += k
            c.sendall(b"%d\n" % total)
        elif cmd[0] == b"SOURCE":
            send_n(c, int(cmd[1]))
        elif cmd[0] == b"RTT":
            size = int(cmd[1])
            with contextlib.suppress(EOFError, OSError):
                while True:
                    recv_exact(c, size, buf)
                    c.sendall(buf[:size])
        c.close()

    while True:
        c, _ = ls.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def report(
    size: int, rounds: list[dict[str, Figures]], meter: CpuMeter, n: int, count: int
) -> None:
    cols = list(rounds[0])
    print(
        f"{size} MiB each way, RTT = median of {count} x 64-byte ping-pong;"
        f" median of {len(rounds)} rounds (transports take turns in each)"
    )
    print(f"{'':24}" + "".join(f"{c:>15}" for c in cols) + f"{'vsock/serial':>15}")
    for i, label in enumerate(FIGURES):
        cells = "".join(f"{statistics.median(r[c][i] for r in rounds):15.0f}" for c in cols)
        # within each round, so a slow minute hits both; above 1: vsock is faster
        fast, slow = ("virtio-serial", "vsock") if i == 2 else ("vsock", "virtio-serial")
        ratios = [r[fast][i] / r[slow][i] for r in rounds]
        print(f"{label:24}{cells}{statistics.median(ratios):15.2f}")
    print("(vsock/serial: vsock's speed relative to virtio-serial's; above 1 vsock is faster)")
    print("\nwhere the time went: CPU per MiB moved (per round trip for RTT), all rounds")
    print(f"{'':24}{'vsock: backend':>16}{'QEMU':>8}{'serial: QEMU':>14}")
    units = (n * len(rounds) / MiB, n * len(rounds) / MiB, count * len(rounds))
    for i, label in enumerate(FIGURES):
        v, ser = meter.spent[("vsock", i)], meter.spent[("virtio-serial", i)]
        scale = 1e6 / units[i]  # microseconds per unit
        unit = "us/round trip" if i == 2 else "us/MiB"
        name = f"{label.split()[0]} ({unit})"
        cpu = (v["backend"], v["qemu"], ser["qemu"])
        cells = "".join(f"{x * scale:{w}.0f}" for x, w in zip(cpu, (16, 8, 14), strict=True))
        print(f"{name:24}{cells}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="MiB per direction per round (64)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of every transport (5)")
    ap.add_argument("--rtt-count", type=int, default=1000, help="round trips per round (1000)")
    ap.add_argument("--unix-peer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.unix_peer:
        unix_peer(args.unix_peer)
        return 0
    n = args.size * MiB
    image = Path(
        subprocess.run(
            [sys.executable, str(ROOT / "images/test-vsock/build.py")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[-1]
    )
    rounds: list[dict[str, Figures]] = []
    with tempfile.TemporaryDirectory(prefix="criv-bench-") as td:
        vm = VM(image, Path(td), serial=True)
        peer: subprocess.Popen[bytes] | None = None
        fwd: Forwarder | None = None
        try:
            t0 = time.monotonic()
            vm.start()
            print(f"guest up in {time.monotonic() - t0:.1f}s (QEMU TCG, 1 vCPU)", file=sys.stderr)
            assert vm.qemu is not None and vm.backend.pid is not None
            meter = CpuMeter({"backend": vm.backend.pid, "qemu": vm.qemu.pid})

            def dial_vsock(cmd: str) -> socket.socket:
                return vm.connect(cmd, timeout=120)

            fwd_path = os.path.join(td, "fwd.sock")
            fwd = Forwarder.unix_listener(fwd_path, lambda: hybrid_connect(vm.uds, GUEST_PORT))
            fwd.start()

            def dial_path(path: str) -> Dial:
                def dial(cmd: str) -> socket.socket:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(120)
                    s.connect(path)
                    s.sendall(cmd.encode() + b"\n")
                    return s

                return dial

            peer_path = os.path.join(td, "peer.sock")
            peer = subprocess.Popen(
                [sys.executable, __file__, "--unix-peer", peer_path], stdout=subprocess.PIPE
            )
            assert peer.stdout is not None
            peer.stdout.readline()

            def unmetered(figure: int) -> contextlib.AbstractContextManager[None]:
                return contextlib.nullcontext()

            def metered(name: str) -> Callable[[int], contextlib.AbstractContextManager[None]]:
                return lambda figure: meter.phase(name, figure)

            # warm up: the guest's TCG translation cache and the page cache on both sides
            stream_bench(dial_vsock, 16 * MiB, 200, unmetered)
            serial_bench(vm, 16 * MiB, 200, unmetered)
            for k in range(args.rounds):
                one: dict[str, Figures] = {}
                one["vsock"] = stream_bench(dial_vsock, n, args.rtt_count, metered("vsock"))
                one["vsock+splice"] = stream_bench(
                    dial_path(fwd_path), n, args.rtt_count, unmetered
                )
                one["virtio-serial"] = serial_bench(vm, n, args.rtt_count, metered("virtio-serial"))
                one["unix"] = stream_bench(dial_path(peer_path), n, args.rtt_count, unmetered)
                rounds.append(one)
                print(f"round {k + 1}/{args.rounds} done", file=sys.stderr)
            rss = vm.backend.rss_kib()
        finally:
            if fwd is not None:
                fwd.close()
            if peer is not None:
                peer.kill()
                peer.wait()
            vm.stop()
    report(args.size, rounds, meter, n, args.rtt_count)
    print(f"backend RSS after the run: {rss} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
