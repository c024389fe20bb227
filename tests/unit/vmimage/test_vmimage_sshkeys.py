"""Pod keys, host key pins and the console's host key lines (criv.vmimage.sshkeys)."""

from __future__ import annotations

import base64
import io
import os
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko
import pytest

from criv.errors import FailedPrecondition, HostKeyMismatch, InvalidArgument
from criv.vmimage.sshcommand import command_line
from criv.vmimage.sshkeys import (
    HostKeyPin,
    ensure_pod_key,
    find_host_key_pins,
    fingerprint,
    generate_host_key,
    pin_from_console,
)


def test_pod_key_is_private_and_stable(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    key = ensure_pod_key(d, "criv-pod-abc")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(key.path).st_mode) == 0o600
    assert key.path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    kind, b64, comment = key.public_line.split(" ")
    assert (kind, comment) == ("ssh-ed25519", "criv-pod-abc")
    loaded = key.load()
    assert isinstance(loaded, paramiko.Ed25519Key)
    assert base64.b64decode(b64) == loaded.asbytes()
    again = ensure_pod_key(d, "criv-pod-abc")
    assert again.public_line == key.public_line  # loaded, not regenerated


def test_pod_key_concurrent_callers_agree(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    with ThreadPoolExecutor(8) as pool:
        lines = set(pool.map(lambda _: ensure_pod_key(d, "c").public_line, range(16)))
    assert len(lines) == 1
    assert sorted(p.name for p in d.iterdir()) == ["id_ed25519"]  # no temp files left


def test_pod_key_refuses_bad_comment_and_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        ensure_pod_key(tmp_path / "k", "a b\nssh-rsa AAAA")
    d = tmp_path / "k2"
    d.mkdir()
    (d / "id_ed25519").symlink_to("/etc/passwd")
    with pytest.raises(FailedPrecondition):
        ensure_pod_key(d, "x")
    (d / "id_ed25519").unlink()
    (d / "id_ed25519").write_text("not a key")
    with pytest.raises(FailedPrecondition):
        ensure_pod_key(d, "x")


def _keygen(tmp_path: Path, kind: str = "ed25519") -> tuple[str, str]:
    """(public key line, `ssh-keygen -l` line) of a fresh key."""
    path = tmp_path / f"k_{kind}"
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", f"{path}.pub"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return (tmp_path / f"k_{kind}.pub").read_text().strip(), listed


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_pin_forms_agree(tmp_path: Path, kind: str) -> None:
    if subprocess.run(["which", "ssh-keygen"], capture_output=True).returncode:
        pytest.skip("no ssh-keygen")
    pub, listed = _keygen(tmp_path, kind)
    blob = base64.b64decode(pub.split()[1])
    want = HostKeyPin.from_blob(blob)
    assert HostKeyPin.parse(pub) == want
    assert HostKeyPin.parse(listed) == want
    assert HostKeyPin.parse(f"criv-hostkey: {listed}") == want
    assert HostKeyPin.parse(str(want)) == want
    assert want.matches(blob)
    assert not want.matches(blob[:-1] + bytes([blob[-1] ^ 1]))


def test_pin_rejects_what_is_not_a_host_key() -> None:
    # a blob whose inner type is not the one named
    wrong_inner = base64.b64encode(b"\0\0\0\x07ssh-rsa" + b"x" * 40).decode()
    bad = [
        "",
        "hello",
        "256 MD5:aa:bb (ED25519)",
        "ssh-dss AAAAB3NzaC1kc3MAAACB",
        "1024 SHA256:" + "A" * 43 + " x (DSA)",
        "ssh-ed25519 " + wrong_inner,
    ]
    for line in bad:
        with pytest.raises(InvalidArgument):
            HostKeyPin.parse(line)


def test_pin_check_names_both_keys() -> None:
    a, b = generate_host_key(), generate_host_key()
    key_b = paramiko.Ed25519Key.from_private_key(io.StringIO(b.private_openssh))
    a.pin.check(paramiko.Ed25519Key.from_private_key(io.StringIO(a.private_openssh)), "h:22")
    with pytest.raises(HostKeyMismatch) as e:
        a.pin.check(key_b, "10.0.0.2:22")
    assert str(a.pin) in str(e.value) and b.pin.sha256 in str(e.value)
    assert "10.0.0.2:22" in str(e.value)


CLOUD_INIT = """\
[   12.345678] cloud-init[321]: Cloud-init v. 23.1 running 'modules:final'
ci-info: no authorized SSH keys fingerprints found for user debian.
<14>Dec  6 14:00:00 cloud-init: #############################################################
<14>Dec  6 14:00:00 cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----
<14>Dec  6 14:00:00 cloud-init: 256 SHA256:{ecdsa} root@vm (ECDSA)
<14>Dec  6 14:00:00 cloud-init: 256 SHA256:{ed} root@vm (ED25519)
<14>Dec  6 14:00:00 cloud-init: -----END SSH HOST KEY FINGERPRINTS-----
-----BEGIN SSH HOST KEY KEYS-----
{pub}
-----END SSH HOST KEY KEYS-----
"""


def test_console_cloud_init_block_prefers_ed25519() -> None:
    host = generate_host_key()
    ecdsa = "E" * 43
    text = CLOUD_INIT.format(ecdsa=ecdsa, ed=host.pin.sha256, pub=host.public_line + " root@vm")
    pins = find_host_key_pins(text.encode())
    assert HostKeyPin("ecdsa-sha2-nistp256", ecdsa) in pins
    assert host.pin in pins
    assert pin_from_console(text.replace("\n", "\r\n").encode()) == host.pin


def test_console_criv_line_wins_and_conflicts_are_refused() -> None:
    ours, other = generate_host_key(), generate_host_key()
    text = f"{other.public_line}\nboot...\ncriv-hostkey: {ours.pin}\n"
    assert find_host_key_pins(text.encode()) == [ours.pin]
    assert pin_from_console(text.encode()) == ours.pin
    two = f"criv-hostkey: {ours.pin}\ncriv-hostkey: {other.pin}\n"
    with pytest.raises(HostKeyMismatch):
        pin_from_console(two.encode())
    assert pin_from_console(b"no keys here\n" * 100) is None


def test_console_scan_is_bounded() -> None:
    host = generate_host_key()
    late = b"x" * 2_000_000 + f"\ncriv-hostkey: {host.pin}\n".encode()
    assert pin_from_console(late) is None  # past MAX_CONSOLE_SCAN
    long_line = b"y" * 100_000 + f" criv-hostkey: {host.pin}\n".encode()
    assert pin_from_console(long_line) is None  # past MAX_LINE within the line
    garbage = (b"ssh-ed25519 AAAA" + b"A" * 5000 + b" ") * 200 + b"\xff\x00" * 1000
    assert pin_from_console(garbage) is None


def test_fingerprint_matches_ssh_keygen_form() -> None:
    host = generate_host_key()
    blob = base64.b64decode(host.public_line.split()[1])
    assert len(fingerprint(blob)) == 43 and host.pin.sha256 == fingerprint(blob)


def test_command_line_quotes_every_argument() -> None:
    assert command_line(["echo", "a b", "it's", "x; rm -rf /", "$(id)"]) == (
        "echo 'a b' 'it'\"'\"'s' 'x; rm -rf /' '$(id)'"
    )
    for bad in [[], [""], ["echo", "a\0b"], ["x" * 200_000]]:
        with pytest.raises(InvalidArgument):
            command_line(bad)
