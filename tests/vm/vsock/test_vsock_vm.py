"""criv's vhost-user-vsock backend against a real Linux guest (QEMU TCG)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from criv.vsock.connector import (
    HybridVsockConnector,
    VsockBackendUnavailable,
    VsockConnectionRefused,
    VsockError,
    hybrid_connect,
)
from criv.vsock.splice import Forwarder
from tests.vm.vsock.vsockvm import (
    GUEST_PORT,
    VM,
    read_line,
    recv_all,
    stream_blocks,
    wait_for_log,
)

pytestmark = pytest.mark.vm

MiB = 1 << 20
STALL_REPORT = b": stalled "  # criv.vsock.health's report


def send_then_eof(s: socket.socket, data: bytes) -> threading.Thread:
    """Send ``data`` and shut the write side, in a thread (the reader runs meanwhile)."""

    def run() -> None:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=run)
    t.start()
    return t


def host_listener(vm: VM, port: int) -> socket.socket:
    """Where guest connections to CID 2 ``port`` are delivered: ``<uds>_<port>``."""
    path = f"{vm.uds}_{port}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    s.settimeout(30)
    return s


@pytest.mark.timeout(60)
def test_host_to_guest_echo(vm: VM) -> None:
    s = vm.connect("ECHO")
    s.sendall(b"hello guest")
    assert s.recv(100) == b"hello guest"
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b""
    s.close()


@pytest.mark.timeout(60)
def test_asyncio_connector(vm: VM) -> None:
    async def go() -> bytes:
        reader, writer = await HybridVsockConnector(vm.uds).open_connection(GUEST_PORT)
        writer.write(b"ECHO\nping")
        await writer.drain()
        data = await reader.readexactly(4)
        writer.close()
        await writer.wait_closed()
        return data

    assert asyncio.run(go()) == b"ping"


@pytest.mark.timeout(60)
def test_listen_port_socket_goes_to_guest_port(vm: VM) -> None:
    """--listen-port: plain unix connect, no handshake (what grpcio dials)."""
    target = HybridVsockConnector(vm.uds).grpc_target(GUEST_PORT)
    assert target.startswith("unix:")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(target[len("unix:") :])
    s.sendall(b"ECHO\nthrough the port socket")
    got = b""
    while len(got) < len(b"through the port socket"):
        got += s.recv(100)
    assert got == b"through the port socket"
    s.close()


@pytest.mark.timeout(60)
def test_guest_to_host(vm: VM) -> None:
    ls = host_listener(vm, 5555)
    ctl = vm.connect("CONNECT 5555 ECHO")
    conn, _ = ls.accept()
    assert read_line(ctl) == b"CONNECTED\n"
    conn.settimeout(30)
    payload = os.urandom(300_000)
    send_then_eof(conn, payload)
    assert recv_all(conn) == payload
    assert read_line(ctl) == b"OK 300000\n"
    conn.close()
    ls.close()
    ctl.close()


@pytest.mark.timeout(60)
def test_guest_connect_to_unlistened_host_port_is_reset(vm: VM) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{vm.uds}_5556")
    ctl = vm.connect("CONNECT 5556 ECHO")
    assert read_line(ctl) == b"ERR 104\n"  # ECONNRESET: the host side answered RST
    ctl.close()


@pytest.mark.timeout(60)
def test_host_connect_to_unlistened_guest_port_is_refused(vm: VM) -> None:
    with pytest.raises(VsockConnectionRefused):
        hybrid_connect(vm.uds, 4444, timeout=10)

    async def go() -> None:
        await HybridVsockConnector(vm.uds).open_connection(4444)

    with pytest.raises(VsockConnectionRefused):
        asyncio.run(go())


@pytest.mark.timeout(180)
def test_64_concurrent_streams(vm: VM) -> None:
    size = 256 * 1024
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            data = os.urandom(size)
            s = vm.connect("ECHO", timeout=120)
            t = send_then_eof(s, data)
            got = recv_all(s)
            t.join()
            s.close()
            if got != data:
                errors.append(f"stream {i}: {len(got)} bytes back, mismatch")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(f"stream {i}: {e!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def no_stall(vm: VM, what: str, step: Callable[[], None]) -> None:
    """Run ``step``; a stream that stops moving fails with the backend's counters and logs
    (its own stall report included), not a bare timeout."""
    try:
        step()
    except TimeoutError:
        pytest.fail(f"{what} stalled:\n{vm.diagnose()}")


def receive_source(vm: VM, command: str, n: int, seed: int, what: str) -> float:
    """Send ``command`` (the guest then sends ``n`` bytes of the ``seed`` test stream),
    receive it all and check it; the seconds that took."""
    expect = hashlib.sha256()
    for blk in stream_blocks(n, seed):
        expect.update(blk)
    s = vm.connect(command, timeout=60)
    got = hashlib.sha256()
    total = 0
    buf = bytearray(MiB)
    t0 = time.monotonic()

    def down() -> None:
        nonlocal total
        while k := s.recv_into(buf):
            got.update(memoryview(buf)[:k])
            total += k

    no_stall(vm, what, down)
    secs = time.monotonic() - t0
    s.close()
    assert total == n
    assert got.hexdigest() == expect.hexdigest()
    return secs


@pytest.mark.timeout(300)
def test_256mib_each_way_sha256(vm: VM) -> None:
    n = 256 * MiB
    log = vm.dir / "backend.log"
    log_start = log.stat().st_size
    # host -> guest: the guest hashes what it received
    s = vm.connect("SINK", timeout=60)
    h = hashlib.sha256()
    t0 = time.monotonic()

    def up() -> None:
        for blk in stream_blocks(n, 11):
            s.sendall(blk)
            h.update(blk)
        s.shutdown(socket.SHUT_WR)

    no_stall(vm, "host -> guest", up)
    line = b""

    def answer() -> None:
        nonlocal line
        line = read_line(s)

    no_stall(vm, "the guest's answer", answer)
    count, digest = line.split()
    up_mbs = n / (time.monotonic() - t0) / 1e6
    s.close()
    assert int(count) == n
    assert digest.decode() == h.hexdigest()
    # guest -> host
    down_mbs = n / receive_source(vm, f"SOURCE {n} 12", n, 12, "guest -> host") / 1e6
    assert STALL_REPORT not in log.read_bytes()[log_start:]
    print(
        f"\n256 MiB host->guest {up_mbs:.0f} MB/s (guest sha256 under TCG),"
        f" guest->host {down_mbs:.0f} MB/s"
    )


@pytest.mark.timeout(120)
def test_a_guest_socket_with_a_small_buffer_does_not_stall(vm: VM) -> None:
    """Linux keeps at most its own socket's buffer size in flight to the host, whatever
    credit the host gave: the backend must grant more before that window is used up (it
    once waited for half of its own 256 KiB, and a 32 KiB guest socket stopped)."""
    n = 8 * MiB
    receive_source(vm, f"BUFSIZE {32 * 1024} SOURCE {n} 21", n, 21, "a 32 KiB guest socket")


@pytest.mark.timeout(120)
def test_stalled_stream_is_reported(vm: VM) -> None:
    """Nobody reads the echo: both directions fill up and stop.  The backend says so, with
    the credit counters, and says so again when the stream moves."""
    start = (vm.dir / "backend.log").stat().st_size
    s = vm.connect("ECHO", timeout=60)
    data = os.urandom(4 * MiB)
    t = send_then_eof(s, data)
    report = wait_for_log(vm, start, STALL_REPORT)
    for counter in (b"buf_alloc=", b"fwd_cnt=", b"tx_cnt=", b"peer_buf_alloc=", b"peer_fwd_cnt="):
        assert counter in report
    got = bytearray()
    while len(got) < MiB:
        got += s.recv(MiB)
    wait_for_log(vm, start, b"moving again")
    got += recv_all(s)
    assert got == data
    t.join()
    s.close()


@pytest.mark.timeout(60)
def test_half_close_both_directions(vm: VM) -> None:
    # host shuts its write side; the guest still answers on the same stream
    s = vm.connect("SINK")
    s.sendall(b"x" * 1000)
    s.shutdown(socket.SHUT_WR)
    assert read_line(s).split()[0] == b"1000"
    assert recv_all(s) == b""
    s.close()
    # the guest shuts its write side; the host still sends and the guest reads it
    s = vm.connect("SOURCE 5000 3")
    assert len(recv_all(s)) == 5000  # EOF after the guest's shutdown(SHUT_WR)
    s.sendall(b"after-eof")
    s.shutdown(socket.SHUT_WR)
    s.close()
    deadline = time.monotonic() + 20
    while True:
        r = vm.connect("RESULT")
        res = recv_all(r)
        r.close()
        if res or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert res == b"OK 5000 back 9\n"


@pytest.mark.timeout(60)
def test_host_abort_resets_guest_stream(vm: VM) -> None:
    """The host side goes away mid-stream: the guest writer gets an error, not a hang."""
    s = vm.connect(f"SOURCE {1 << 40} 5")
    got = 0
    while got < 2 * MiB:
        got += len(s.recv(MiB))
    s.close()
    deadline = time.monotonic() + 20
    res = b""
    while time.monotonic() < deadline:
        r = vm.connect("RESULT")
        res = recv_all(r)
        r.close()
        if res:
            break
        time.sleep(0.2)
    assert res.startswith(b"ERR "), res
    # the VM and the backend still work
    e = vm.connect("ECHO")
    e.sendall(b"still alive")
    assert e.recv(100) == b"still alive"
    e.close()


@pytest.mark.timeout(60)
def test_guest_peer_reset_seen_by_host(vm: VM) -> None:
    """The guest side aborts (its process exits while the host still sends): the host
    sees the stream end (EOF / EPIPE / ECONNRESET) promptly."""
    ls = host_listener(vm, 5557)
    ctl = vm.connect("CONNECT 5557 RTT 8")
    conn, _ = ls.accept()
    conn.settimeout(30)
    conn.sendall(b"12345678")
    assert conn.recv(8) == b"12345678"
    ctl.close()
    # half an RTT message, then the host hangs up: the guest's read sees EOF and it exits
    conn.sendall(b"1234")
    conn.shutdown(socket.SHUT_WR)
    assert recv_all(conn) == b""
    conn.close()
    ls.close()


@pytest.mark.timeout(60)
def test_splice_forwarder_to_guest(vm: VM, tmp_path: Path) -> None:
    path = str(tmp_path / "fwd.sock")
    fwd = Forwarder.unix_listener(path, lambda: hybrid_connect(vm.uds, GUEST_PORT))
    fwd.start()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(path)
        data = os.urandom(4 * MiB)
        t = send_then_eof(s, b"ECHO\n" + data)
        assert recv_all(s) == data
        t.join()
        s.close()
    finally:
        fwd.close()


@pytest.mark.timeout(30)
def test_backend_reports_rss(vm: VM) -> None:
    status = json.loads((vm.dir / "status.json").read_text())
    assert status["pid"] == vm.backend.pid
    rss = vm.backend.rss_kib()
    assert rss is not None and rss < 64 * 1024, rss
    print(f"\nbackend RSS {rss} KiB")


@pytest.mark.timeout(180)
def test_guest_reboot(make_vm: Callable[..., VM]) -> None:
    v = make_vm(cid=4)
    old = v.connect("ECHO")
    r = v.connect("REBOOT")
    assert read_line(r) == b"REBOOTING\n"
    r.close()
    # the old stream dies with the device reset
    old.settimeout(60)
    with contextlib.suppress(OSError):
        assert recv_all(old) == b""
    old.close()
    v.wait_guest(120)
    e = v.connect("ECHO")
    e.sendall(b"after reboot")
    assert e.recv(100) == b"after reboot"
    e.close()
    assert v.backend.alive()


@pytest.mark.timeout(120)
def test_backend_killed_fails_cleanly(make_vm: Callable[..., VM]) -> None:
    v = make_vm(cid=5)
    s = v.connect("ECHO")
    pid = v.backend.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    v.backend.wait(10)
    s.settimeout(10)
    with contextlib.suppress(OSError):
        assert recv_all(s) == b""  # EOF or ECONNRESET, never a hang
    s.close()
    with pytest.raises(VsockBackendUnavailable):
        hybrid_connect(v.uds, GUEST_PORT, timeout=5)
    with pytest.raises(VsockError):
        asyncio.run(HybridVsockConnector(v.uds).open_connection(GUEST_PORT, timeout=5))
    # QEMU must still be stoppable promptly (teardown checks nothing is left)
    assert v.qemu is not None
    t0 = time.monotonic()
    v.stop()
    assert time.monotonic() - t0 < 15
