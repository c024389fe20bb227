"""Attach on a vm-image VM's serial console (criv/sandbox/vmimage/serial.py) against a
real pty pair standing in for QEMU's: output fanned out to two sessions, input typed on
the console, a session that leaves does not end the other, and the VM's end (QEMU closes
its side) gives CLOSE and EXIT with the container's exit code."""

from __future__ import annotations

import asyncio
import os
import tty
from pathlib import Path

import pytest

from criv.sandbox.vmimage.serial import MAX_BEHIND, SerialConsole, run_attach
from criv_agent import execframes as fr

pytestmark = pytest.mark.timeout(30)


def _console() -> tuple[int, SerialConsole]:
    """A pty pair as QEMU's console (QEMU holds the master, libvirt names the slave) and
    criv's console opened on the slave's name; the master is non-blocking."""
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.close(slave)
    os.set_blocking(master, False)
    console = SerialConsole(path)
    console.open()
    return master, console


async def _pair(
    tmp_path: Path, console: SerialConsole, n: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Task[None]]:
    sock = str(tmp_path / f"s{n}.sock")
    done: asyncio.Future[asyncio.Task[None]] = asyncio.get_running_loop().create_future()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        done.set_result(task)
        await run_attach(console, r, w, lambda: 3)
        w.close()

    await asyncio.start_unix_server(serve, path=sock)
    reader, writer = await asyncio.open_unix_connection(sock)
    return reader, writer, await done


async def _frames_until(reader: asyncio.StreamReader, want: bytes) -> bytes:
    got = b""
    while want not in got:
        kind, payload = await asyncio.wait_for(fr.read_frame(reader), 5)
        assert kind == fr.STDOUT
        got += payload
    return got


async def test_attach_on_a_pty(tmp_path: Path) -> None:
    master, console = _console()
    r1, w1, _t1 = await _pair(tmp_path, console, 1)
    r2, w2, t2 = await _pair(tmp_path, console, 2)
    await asyncio.sleep(0.1)
    os.write(master, b"login: ")
    assert b"login: " in await _frames_until(r1, b"login: ")
    assert b"login: " in await _frames_until(r2, b"login: ")
    # typed on the console: the guest reads it
    w1.write(fr.frame(fr.STDIN, b"echo hi\n") + fr.frame(fr.RESIZE, b"\0\0\0\x50\0\0\0\x18"))
    await w1.drain()
    got = b""
    for _ in range(100):
        try:
            got += os.read(master, 100)
        except BlockingIOError:
            await asyncio.sleep(0.02)
        if b"\n" in got:
            break
    assert got == b"echo hi\n"
    # session 2 leaves: session 1 goes on
    w2.close()
    await asyncio.wait_for(t2, 5)
    os.write(master, b"hi\r\n")
    assert b"hi\r\n" in await _frames_until(r1, b"hi\r\n")
    # the VM stops: its side of the pty closes; the session ends with the exit code
    os.close(master)
    frames = []
    while True:
        kind, payload = await asyncio.wait_for(fr.read_frame(r1), 5)
        frames.append((kind, payload))
        if kind == fr.EXIT:
            break
    assert frames[-3:-1] == [(fr.CLOSE, bytes([fr.STDOUT])), (fr.CLOSE, bytes([fr.STDERR]))]
    assert frames[-1][0] == fr.EXIT and fr.parse_exit(frames[-1][1]) == 3
    assert console.closed
    w1.close()


async def test_a_slow_session_loses_output_not_the_guest(tmp_path: Path) -> None:
    master, console = _console()
    s = console.join()  # never read while the guest writes 3 MiB
    data, sent = b"x" * 65536, 0
    while sent < 3 * MAX_BEHIND:
        try:
            sent += os.write(master, data)
        except BlockingIOError:
            await asyncio.sleep(0.001)  # criv's reader drains the pty: never stuck here
    await asyncio.sleep(0.2)
    got = await s.read()
    assert 0 < len(got) <= MAX_BEHIND and s.dropped >= sent - MAX_BEHIND - 65536
    console.leave(s)  # the last session: the pty is released
    assert console.closed
    os.close(master)
