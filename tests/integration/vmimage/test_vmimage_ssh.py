"""criv's SSH layer (criv.vmimage.ssh) against a real OpenSSH server (conftest: sshd)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from sshd_support import Sshd

from criv.errors import HostKeyMismatch, SSHUnavailable
from criv.vmimage.ssh import SSHClient
from criv.vmimage.sshkeys import ensure_pod_key, generate_host_key
from criv.vmimage.sshstream import SSHStream

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(sshd: Sshd) -> AsyncIterator[SSHClient]:
    c = SSHClient(sshd.target())
    yield c
    await c.close()


async def test_exit_codes(client: SSHClient) -> None:
    assert (await client.exec_sync(["true"], timeout=20)).exit_code == 0
    r = await client.exec_sync(["sh", "-c", "exit 3"], timeout=20)
    assert (r.exit_code, r.timed_out, r.truncated) == (3, False, False)
    # killed by a signal: the server's exit-signal becomes 128+N
    assert (await client.exec_sync(["sh", "-c", "kill -KILL $$"], timeout=20)).exit_code == 137
    assert (await client.exec_sync(["sh", "-c", "kill -TERM $$"], timeout=20)).exit_code == 143


async def test_stdout_stderr_and_stdin(client: SSHClient) -> None:
    r = await client.exec_sync(["sh", "-c", "echo out; echo err >&2; echo out2"], timeout=20)
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\nout2\n", b"err\n", 0)
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    r = await client.exec_sync(["cat"], timeout=20, stdin=data)
    assert r.stdout == data and r.exit_code == 0
    # no stdin: the command sees EOF at once instead of waiting for the timeout
    r = await client.exec_sync(["cat"], timeout=20)
    assert (r.stdout, r.exit_code, r.timed_out) == (b"", 0, False)


async def test_output_capped_without_hanging(client: SSHClient) -> None:
    t0 = time.monotonic()
    r = await client.exec_sync(
        ["sh", "-c", "head -c 50000000 /dev/zero; head -c 3000000 /dev/zero >&2; exit 4"],
        timeout=60,
        output_limit=1 << 20,
    )
    assert (len(r.stdout), len(r.stderr), r.truncated, r.exit_code) == (1 << 20, 1 << 20, True, 4)
    assert time.monotonic() - t0 < 30


async def test_big_stdin_and_big_output_at_once(client: SSHClient) -> None:
    # stdin is written while output is read: neither side waits on the other's window
    data = b"0123456789abcdef" * (512 * 1024)  # 8 MiB
    r = await client.exec_sync(["cat"], timeout=60, stdin=data, output_limit=1 << 20)
    assert (r.stdout, r.truncated, r.exit_code) == (data[: 1 << 20], True, 0)


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return not stat.split(") ")[1].startswith("Z")


async def test_timeout_reports_and_kills(client: SSHClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    r = await client.exec_sync(
        ["sh", "-c", f"echo started; echo $$ > {pidfile}; exec sleep 60"], timeout=1.5
    )
    assert r.timed_out and r.exit_code is None
    assert r.stdout == b"started\n"
    assert time.monotonic() - t0 < 10
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _pid_alive(pid):
        assert time.monotonic() < deadline, "the timed-out command still runs"
        await asyncio.sleep(0.1)
    # the connection is still good for the next command
    assert (await client.exec_sync(["echo", "ok"], timeout=20)).stdout == b"ok\n"


async def test_cancelled_exec_kills(client: SSHClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    task = asyncio.create_task(
        client.exec_sync(
            ["sh", "-c", f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 60"]
        )
    )
    async with asyncio.timeout(20):
        while not pidfile.exists():
            await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _pid_alive(pid):
        assert time.monotonic() < deadline, "the cancelled command still runs"
        await asyncio.sleep(0.1)


async def test_quoting_is_not_injection(client: SSHClient, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    args = ["a b", "it's", '"q"', f"x; touch {marker}", f"$(touch {marker})", "`id`", "*", "\\"]
    r = await client.exec_sync(["printf", "%s\\n", *args], timeout=20)
    assert r.stdout.decode().split("\n")[:-1] == args
    assert not marker.exists()


async def _read_all(read: Callable[[], Awaitable[bytes]]) -> bytes:
    out = b""
    while chunk := await read():
        out += chunk
    return out


async def _read_until(stream: SSHStream, want: bytes, timeout: float = 20) -> bytes:
    buf = b""
    async with asyncio.timeout(timeout):
        while want not in buf:
            chunk = await stream.read_stdout()
            assert chunk, f"EOF before {want!r}; got {buf!r}"
            buf += chunk
    return buf


async def test_stream_stdin_stdout_stderr_exit(client: SSHClient) -> None:
    s = await client.open_stream(["sh", "-c", "cat; echo bye >&2; exit 5"])
    await s.write_stdin(b"hello ")
    await s.write_stdin(b"world")
    await s.close_stdin()
    out, err = await asyncio.gather(_read_all(s.read_stdout), _read_all(s.read_stderr))
    assert (out, err) == (b"hello world", b"bye\n")
    assert await asyncio.wait_for(s.wait(), 20) == 5
    await s.close()


async def test_tty_exec_with_resize(client: SSHClient) -> None:
    s = await client.open_stream(
        ["sh", "-c", "stty size; read x; stty size; exit 7"], tty=True, width=100, height=30
    )
    assert b"30 100" in await _read_until(s, b"30 100")
    await s.resize(120, 40)
    await s.write_stdin(b"\n")
    assert b"40 120" in await _read_until(s, b"40 120")
    assert await asyncio.wait_for(s.wait(), 20) == 7
    assert await s.read_stderr() == b""  # a tty has one output stream
    await s.close()


async def test_stream_close_kills(client: SSHClient, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    s = await client.open_stream(["sh", "-c", f"echo $$ > {pidfile}; echo up; exec sleep 60"])
    assert await s.read_stdout() == b"up\n"
    await s.close()
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _pid_alive(pid):
        assert time.monotonic() < deadline, "the closed session's command still runs"
        await asyncio.sleep(0.1)
    try:  # the server may still report the kill, or the channel ends with no status
        code: int | None = await asyncio.wait_for(s.wait(), 10)
    except SSHUnavailable:
        code = None
    assert code in (None, 137)
    with pytest.raises(SSHUnavailable):
        await s.write_stdin(b"x")


async def test_host_key_mismatch_refused(sshd: Sshd) -> None:
    other = SSHClient(sshd.target(pin=generate_host_key().pin))
    with pytest.raises(HostKeyMismatch) as e:
        await other.exec_sync(["true"], timeout=20)
    assert str(sshd.pin) in str(e.value) or sshd.pin.sha256 in str(e.value)
    await other.close()


async def test_wrong_pod_key_refused(sshd: Sshd, tmp_path: Path) -> None:
    stranger = ensure_pod_key(tmp_path / "stranger", "stranger")
    c = SSHClient(sshd.target(key=stranger.load()))
    with pytest.raises(SSHUnavailable, match="refused"):
        await c.connect()
    await c.close()


async def test_connection_refused_is_unavailable_quickly(sshd: Sshd) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = SSHClient(sshd.target(port=port))
    t0 = time.monotonic()
    with pytest.raises(SSHUnavailable) as e:
        await c.exec_sync(["true"], timeout=30)
    assert time.monotonic() - t0 < 3
    assert f"127.0.0.1:{port}" in str(e.value)


@pytest.fixture
def silent_server() -> Iterator[Callable[[bytes], int]]:
    """TCP servers that accept and then only send ``junk`` (or nothing), for ever."""
    stop = threading.Event()
    socks: list[socket.socket] = []

    def start(junk: bytes) -> int:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        socks.append(srv)

        def serve() -> None:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            socks.append(conn)
            while not stop.is_set():
                try:
                    conn.sendall(junk) if junk else time.sleep(0.05)
                except OSError:
                    return

        threading.Thread(target=serve, daemon=True).start()
        return int(srv.getsockname()[1])

    yield start
    stop.set()
    for s in socks:
        s.close()


async def test_silent_or_flooding_server_is_unavailable_not_a_hang(
    sshd: Sshd, silent_server: Callable[[bytes], int]
) -> None:
    for junk in (b"", b"x" * 65536):  # no banner; a banner line that never ends
        port = silent_server(junk)
        c = SSHClient(sshd.target(port=port, connect_timeout=2.0))
        t0 = time.monotonic()
        with pytest.raises(SSHUnavailable) as e:
            await c.exec_sync(["true"])
        assert time.monotonic() - t0 < 6, junk[:1]
        assert f"127.0.0.1:{port}" in str(e.value)
        await c.close()


async def test_one_connection_many_commands(client: SSHClient) -> None:
    results = await asyncio.gather(
        *(client.exec_sync(["sh", "-c", f"echo {i}; exit {i}"], timeout=30) for i in range(8))
    )
    assert [(r.stdout, r.exit_code) for r in results] == [(f"{i}\n".encode(), i) for i in range(8)]


async def test_connect_from_the_pods_netns(sshd_in_netns: tuple[Sshd, Path]) -> None:
    server, netns = sshd_in_netns
    c = SSHClient(server.target(netns=netns))
    r = await c.exec_sync(["sh", "-c", "echo in-ns"], timeout=20)
    assert (r.stdout, r.exit_code) == (b"in-ns\n", 0)
    await c.close()
    # the same address from criv's own namespace is another host: nothing listens there
    outside = SSHClient(server.target(connect_timeout=2.0))
    with pytest.raises(SSHUnavailable):
        await outside.connect()
    await outside.close()
