"""The VM test disk (images/vm-test-disk/) boots under plain QEMU (TCG, SeaBIOS) from a
per-test qcow2 overlay with a NoCloud seed, prints its host key on the console, answers
SSH (paramiko, host key pinned from the console) as the seed says, and powers off by
itself: from `poweroff` inside, and from the ACPI power button."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from criv.vmimage import seed

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[3]
BUILD = ROOT / "images" / "vm-test-disk" / "build.py"
BOOT_TIMEOUT = 180.0  # TCG on a loaded 2-core machine; ~5 s when idle
KEY_BEGIN, KEY_END = "-----BEGIN SSH HOST KEY KEYS-----", "-----END SSH HOST KEY KEYS-----"


@dataclass
class Vm:
    proc: subprocess.Popen[bytes]
    console: Path
    monitor: Path
    port: int
    key: paramiko.Ed25519Key
    hostname: str
    user: str
    started: float

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_host_key(self, timeout: float) -> paramiko.PKey:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.console_text()
            if KEY_END in text:
                block = text.split(KEY_BEGIN, 1)[1].split(KEY_END, 1)[0]
                kind, b64 = block.split()[:2]
                assert kind == "ssh-ed25519"
                return paramiko.Ed25519Key(data=base64.b64decode(b64))
            assert self.proc.poll() is None, f"QEMU exited early:\n{text[-2000:]}"
            time.sleep(0.2)
        pytest.fail(f"no host key on the console in {timeout} s:\n{self.console_text()[-2000:]}")

    def ssh(self, host_key: paramiko.PKey, user: str, timeout: float) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.get_host_keys().add(f"[127.0.0.1]:{self.port}", host_key.get_name(), host_key)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.connect(
                    "127.0.0.1", self.port, username=user, pkey=self.key, timeout=10,
                    banner_timeout=10, auth_timeout=10, allow_agent=False, look_for_keys=False,
                )  # fmt: skip
                return client
            except (OSError, paramiko.SSHException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"QEMU still running {timeout} s later:\n{self.console_text()[-2000:]}")

    def monitor_command(self, line: str) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.monitor))
            # HMP echoes input one character at a time: wait for the prompt after the
            # command ran, or closing early drops the rest of the line
            seen = b""
            while b"(qemu) " not in seen:
                seen += s.recv(4096) or b"(qemu) "
            s.sendall(line.encode() + b"\n")
            seen = b""
            while b"\r\n(qemu) " not in seen:
                chunk = s.recv(4096)
                if not chunk:
                    break
                seen += chunk


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cmd(client: paramiko.SSHClient, cmd: str) -> tuple[int, str]:
    _, out, _ = client.exec_command(cmd, timeout=30)
    text = out.read().decode()
    return out.channel.recv_exit_status(), text


MAC = "52:54:00:c0:ff:ee"


@pytest.fixture
def boot(test_disk: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Vm]:
    user = getattr(request, "param", "root")
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(test_disk),
         str(overlay)],
        check=True, timeout=30,
    )  # fmt: skip
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    (tmp_path / "id_ed25519").write_bytes(pem)
    key = paramiko.Ed25519Key.from_private_key_file(str(tmp_path / "id_ed25519"))
    hostname = f"vmtest-{uuid.uuid4().hex[:8]}"
    cfg = seed.SeedConfig(
        instance_id=f"i-{uuid.uuid4().hex}",
        hostname=hostname,
        addresses=("10.0.2.15/24",),  # QEMU user networking's defaults
        gateway="10.0.2.2",
        dns_servers=("10.0.2.3",),
        dns_searches=("vmtest.example",),
        ssh_public_key=pub.decode() + " criv-test",
        user=user,
        mac=MAC,  # the init finds the interface by MAC
    )
    iso = seed.build_seed(cfg, tmp_path / "seed.iso")
    port = free_port()
    console, monitor = tmp_path / "console.log", tmp_path / "monitor.sock"
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-M", "q35", "-m", "256", "-smp", "1",
        "-nographic", "-nodefaults", "-no-user-config",
        "-serial", f"file:{console}",
        "-monitor", f"unix:{monitor},server=on,wait=off",
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-drive", f"file={iso},if=virtio,format=raw,readonly=on",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    vm = Vm(proc, console, monitor, port, key, hostname, user, time.monotonic())
    try:
        yield vm
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()


def test_boot_ssh_poweroff(boot: Vm) -> None:
    host_key = boot.wait_host_key(BOOT_TIMEOUT)
    client = boot.ssh(host_key, "root", 60)
    ready = time.monotonic() - boot.started
    try:
        assert run_cmd(client, "hostname") == (0, f"{boot.hostname}\n")
        assert run_cmd(client, "id -u") == (0, "0\n")
        assert run_cmd(client, "exit 3")[0] == 3
        _, resolv = run_cmd(client, "cat /etc/resolv.conf")
        assert "nameserver 10.0.2.3" in resolv
        assert "search vmtest.example" in resolv
        t0 = time.monotonic()
        client.exec_command("poweroff", timeout=10)
    finally:
        client.close()
    assert boot.wait_exit(60) == 0
    print(
        f"[vm-test-disk] start to SSH {ready:.1f} s; poweroff to exit {time.monotonic() - t0:.1f} s"
    )
    assert "criv-test-disk: poweroff" in boot.console_text()


@pytest.mark.parametrize("boot", ["builder"], indirect=True)
def test_seed_user_and_acpi_power_button(boot: Vm) -> None:
    """A user other than root (the seed's ``users:`` entry) gets the key; the ACPI power
    button (what criv's StopContainer will press) powers the VM off."""
    host_key = boot.wait_host_key(BOOT_TIMEOUT)
    client = boot.ssh(host_key, "builder", 60)
    try:
        assert run_cmd(client, "id -un; id -u; echo $HOME") == (0, "builder\n1000\n/home/builder\n")
    finally:
        client.close()
    boot.monitor_command("system_powerdown")
    assert boot.wait_exit(60) == 0
    assert "criv-test-disk: poweroff" in boot.console_text()
