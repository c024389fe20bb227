"""The systemd unit, tmpfiles and sysusers snippets that `make install-service` installs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from criv import unitfiles

CRIV_BIN = unitfiles.CRIV_BIN


def _unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_is_filled_in_and_has_the_settings_criv_relies_on(tmp_path: Path) -> None:
    written = unitfiles.write_files(tmp_path, CRIV_BIN, Path("/etc/criv/other.yaml"))
    unit = tmp_path / "etc/systemd/system/criv.service"
    assert unit in written
    text = unit.read_text()
    assert not re.search(r"@[A-Z]+@", text), "a placeholder was left"
    s = _unit_settings(text)
    assert s["ExecStart"] == [f"{CRIV_BIN} serve --config /etc/criv/other.yaml"]
    assert s["Type"] == ["notify"]
    # VMs, vsock backends and host agents must outlive a criv restart
    assert s["KillMode"] == ["process"]
    assert s["Restart"] == ["on-failure"]
    after = " ".join(s["After"]).split()
    assert "libvirtd.service" in after and "virtlogd.service" in after
    assert s["WantedBy"] == ["multi-user.target"]


def test_without_a_config_the_unit_uses_criv_s_default() -> None:
    text = unitfiles.render(unitfiles.FILES[0].source, CRIV_BIN, None)
    assert f"ExecStart={CRIV_BIN} serve\n" in text


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unitfiles.write_files(tmp_path, CRIV_BIN, None)
    unit = tmp_path / "etc/systemd/system/criv.service"
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # only criv.service's own lines count: other units on the host may warn
    ours = [line for line in r.stderr.splitlines() if "criv.service" in line]
    assert not ours, "\n".join(ours)


def test_systemd_analyze_catches_a_broken_unit(tmp_path: Path) -> None:
    """The verify test above can fail: a bad setting is reported."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unitfiles.write_files(tmp_path, CRIV_BIN, None)
    unit = tmp_path / "etc/systemd/system/criv.service"
    bad = tmp_path / "criv.service"
    bad.write_text(unit.read_text().replace(str(CRIV_BIN), "/nonexistent/criv"))
    r = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0


def test_tmpfiles_creates_criv_s_directories(tmp_path: Path) -> None:
    if shutil.which("systemd-tmpfiles") is None:
        pytest.skip("systemd-tmpfiles is not installed")
    unitfiles.write_files(tmp_path / "files", CRIV_BIN, None)
    snippet = tmp_path / "files/etc/tmpfiles.d/criv.conf"
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(
        ["systemd-tmpfiles", "--create", f"--root={root}", str(snippet)],
        check=True,
        capture_output=True,
    )
    modes = {
        "run/criv": 0o711,
        "var/lib/criv": 0o711,
        "var/lib/criv/cache/guest-image": 0o755,
    }
    for rel, mode in modes.items():
        assert (root / rel).is_dir(), rel
        assert (root / rel).stat().st_mode & 0o7777 == mode, rel


def test_sysusers_makes_the_qemu_account(tmp_path: Path) -> None:
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed")
    from criv.hypervisor.hostsetup import QEMU_USER

    unitfiles.write_files(tmp_path / "files", CRIV_BIN, None)
    snippet = tmp_path / "files/etc/sysusers.d/criv.conf"
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(snippet)], check=True, capture_output=True
    )
    users = {
        ln.split(":")[0]: ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines()
    }
    groups = {
        ln.split(":")[0]: ln.split(":") for ln in (root / "etc/group").read_text().splitlines()
    }
    # the account libvirt runs QEMU as (qemu.conf, hostsetup), as `make services` makes it
    qemu = users[QEMU_USER]
    assert qemu[3] == groups[QEMU_USER][2]
    assert QEMU_USER in groups["kvm"][3].split(","), "in group kvm, for /dev/kvm"
    assert qemu[5:] == ["/nonexistent", "/usr/sbin/nologin"]
