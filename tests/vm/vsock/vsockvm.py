"""Helpers for the vsock VM tests: the VM under test and the guest program's test stream."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from criv.vsock.connector import VsockError, hybrid_connect
from criv.vsock.process import VsockBackendProcess

GUEST_PORT = 1000
BLOCK = 65536


def make_block(seed: int) -> bytearray:
    """Same 64 KiB xorshift64 block as the guest program's make_block()."""
    x = seed or 0x9E3779B97F4A7C15
    m = (1 << 64) - 1
    out = bytearray()
    for _ in range(BLOCK // 8):
        x ^= (x << 13) & m
        x ^= x >> 7
        x ^= (x << 17) & m
        out += struct.pack("<Q", x)
    return out


def stream_blocks(n: int, seed: int) -> Iterator[bytes]:
    """The guest's SOURCE stream, block by block."""
    blk = make_block(seed)
    k = 0
    sent = 0
    while sent < n:
        blk[:8] = struct.pack("<Q", k)
        chunk = bytes(blk[: min(BLOCK, n - sent)])
        yield chunk
        sent += len(chunk)
        k += 1


def wait_for_log(vm: VM, start: int, marker: bytes, timeout: float = 60) -> bytes:
    """The first backend log line after byte ``start`` holding ``marker``."""
    deadline = time.monotonic() + timeout
    while True:
        for line in (vm.dir / "backend.log").read_bytes()[start:].splitlines():
            if marker in line:
                return line
        if time.monotonic() > deadline:
            pytest.fail(f"no {marker!r} in the backend log:\n{vm.logs()}")
        time.sleep(0.5)


class VM:
    def __init__(
        self,
        image: Path,
        workdir: Path,
        *,
        listen_ports: list[int] | None = None,
        cid: int = 3,
        serial: bool = False,
    ) -> None:
        self.image = image
        self.dir = workdir
        self.cid = cid
        self.vhost_sock = str(workdir / "vhost.sock")
        self.uds = str(workdir / "vsock.sock")
        self.console = workdir / "console.log"
        self.serial_sock = str(workdir / "serial.sock") if serial else None
        self.backend = VsockBackendProcess(
            self.vhost_sock,
            self.uds,
            cid,
            listen_ports=listen_ports,
            status_file=str(workdir / "status.json"),
            log_path=str(workdir / "backend.log"),
        )
        self.qemu: subprocess.Popen[bytes] | None = None
        self._qlog: IO[bytes] | None = None

    def qemu_argv(self) -> list[str]:
        argv = [
            "qemu-system-x86_64",
            "-M",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            f"file:{self.console}",
            "-kernel",
            str(self.image / "vmlinux"),
            "-initrd",
            str(self.image / "initramfs.cpio"),
            "-append",
            "console=ttyS0 quiet panic=-1",
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa",
            "node,memdev=mem",
            "-chardev",
            f"socket,id=vs,path={self.vhost_sock}",
            "-device",
            "vhost-user-vsock-pci,chardev=vs",
        ]
        if self.serial_sock:
            argv += [
                "-device",
                "virtio-serial-pci",
                "-chardev",
                f"socket,id=ser,path={self.serial_sock},server=on,wait=off",
                "-device",
                "virtserialport,chardev=ser,name=bench",
            ]
        return argv

    def start(self, timeout: float = 90.0) -> VM:
        self.backend.start().wait_ready()
        self.qemu = subprocess.Popen(
            self.qemu_argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._open_qemu_log(),
            start_new_session=True,
        )
        self.wait_guest(timeout)
        return self

    def _open_qemu_log(self) -> IO[bytes]:
        self._qlog = open(self.dir / "qemu.log", "wb")  # noqa: SIM115
        return self._qlog

    def wait_guest(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                hybrid_connect(self.uds, GUEST_PORT, timeout=5).close()
                return
            except VsockError:
                pass
            if self.qemu is not None and self.qemu.poll() is not None:
                raise RuntimeError(f"QEMU exited: {self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest not reachable on vsock: {self.logs()}")
            time.sleep(0.2)

    def answers(self, timeout: float = 10.0) -> bool:
        """Does the guest still echo over vsock?"""
        try:
            s = self.connect("ECHO", timeout=timeout)
            try:
                s.sendall(b"ping")
                return s.recv(4) == b"ping"
            finally:
                s.close()
        except OSError:  # VsockError, timeouts, resets
            return False

    def diagnose(self) -> str:
        """The backend's state dump (credit counters, rings) and every log, for a failure."""
        if self.backend.alive() and self.backend.pid is not None:
            os.kill(self.backend.pid, signal.SIGUSR1)
            time.sleep(0.5)
        return self.logs()

    def logs(self) -> str:
        parts = []
        for name in ("console.log", "backend.log", "qemu.log"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {name}\n{(self.dir / name).read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def connect(self, command: str, port: int = GUEST_PORT, timeout: float = 30) -> socket.socket:
        s = hybrid_connect(self.uds, port, timeout=10)
        s.settimeout(timeout)
        s.sendall(command.encode() + b"\n")
        return s

    def stop(self) -> None:
        if self.qemu is not None and self.qemu.poll() is None:
            self.qemu.send_signal(signal.SIGTERM)
            try:
                self.qemu.wait(10)
            except subprocess.TimeoutExpired:
                self.qemu.kill()
                self.qemu.wait()
        if self._qlog is not None:
            self._qlog.close()
            self._qlog = None
        self.backend.stop()


class SharedVM:
    """One VM for a module's tests, checked before each test and replaced when its vsock no
    longer answers, so a test that breaks it does not fail the tests after it."""

    def __init__(self, image: Path, root: Path) -> None:
        self.image = image
        self.root = root
        self.vm: VM | None = None
        self.started = 0

    def healthy(self) -> VM:
        if self.vm is not None:
            if self.vm.answers():
                return self.vm
            report = self.vm.diagnose()[-4000:]
            warnings.warn(f"vsock test VM stopped answering, replaced:\n{report}", stacklevel=2)
            self.vm.stop()
        d = self.root / f"vm{self.started}"
        d.mkdir()
        self.started += 1
        self.vm = VM(self.image, d, listen_ports=[GUEST_PORT]).start()
        return self.vm

    def stop(self) -> None:
        if self.vm is not None:
            self.vm.stop()


def read_line(s: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            break
        buf += b
    return bytes(buf)


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while True:
        b = s.recv(1 << 20)
        if not b:
            return bytes(out)
        out += b
