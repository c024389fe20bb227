"""criv doctor: one line per check, non-zero exit when pods cannot run (checks faked)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from criv import doctor
from criv.config import Config, VmConfig
from criv.doctor import Check
from criv.sandbox.vm.template import FORMAT


def _patch(monkeypatch: pytest.MonkeyPatch, image: str) -> None:
    monkeypatch.setattr(doctor, "check_qemu", lambda: Check("qemu", "OK", "QEMU 7.2"))
    monkeypatch.setattr(doctor, "check_accel", lambda c: Check("accel", "WARN", "TCG: no kvm"))
    monkeypatch.setattr(doctor, "check_libvirt", lambda c: [Check("libvirt", "OK", "9.0")])
    monkeypatch.setattr(doctor, "check_vsock", lambda c: Check("vsock", "OK", "backend"))
    monkeypatch.setattr(doctor, "check_crun", lambda c: Check("crun", "OK", "1.8"))
    monkeypatch.setattr(doctor, "check_cni", lambda c: Check("cni", "OK", "ok"))
    monkeypatch.setattr(doctor, "check_registries", lambda c: [])
    monkeypatch.setattr(
        doctor,
        "check_guest_image",
        lambda c: Check("guest image", image, "…"),  # type: ignore[arg-type]
    )


@pytest.mark.timeout(10)
def test_exit_codes_follow_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch(monkeypatch, "OK")
    lines: list[str] = []
    assert doctor.run_doctor(Config(), print_line=lines.append) == 0
    assert lines[0] == "OK   qemu: QEMU 7.2" and lines[1].startswith("WARN accel: TCG")
    assert lines[-1] == "criv can run pods (with warnings)"
    _patch(monkeypatch, "FAIL")
    lines.clear()
    assert doctor.run_doctor(Config(), print_line=lines.append) == 1
    assert lines[-1] == "criv cannot run pods: 1 check(s) failed"


@pytest.mark.timeout(10)
def test_a_crashing_check_is_a_fail_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch(monkeypatch, "OK")

    def boom(c: Config) -> Check:
        raise RuntimeError("no")

    monkeypatch.setattr(doctor, "check_crun", boom)
    lines: list[str] = []
    assert doctor.run_doctor(Config(), print_line=lines.append) == 1
    assert any("check crashed" in line for line in lines)


@pytest.mark.timeout(10)
def test_registry_mirror_unreachable_is_a_warning() -> None:
    from criv.config import RegistriesConfig

    cfg = Config(registries=RegistriesConfig(mirrors={"docker.io": ["http://127.0.0.1:9"]}))
    (c,) = doctor.check_registries(cfg, timeout=1)
    assert c.level == "WARN" and "unreachable" in c.detail


@pytest.mark.timeout(10)
def test_guest_image_cache_under_state_dir() -> None:
    assert doctor.guest_image_cache(Config(state_dir="/srv/criv")) == Path(
        "/srv/criv/cache/guest-image"
    )


@pytest.mark.timeout(10)
def test_templates_are_listed(tmp_path: Path) -> None:
    cfg = Config(vm=VmConfig(template_dir=str(tmp_path)))
    assert "none yet" in doctor.check_templates(cfg).detail
    d = tmp_path / ("ab" * 16)
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"format": FORMAT, "created": time.time() - 7200}))
    with (d / "ram.bin").open("wb") as f:
        f.write(b"x" * (3 << 20))
    (tmp_path / ".cd.building").mkdir()  # a build in progress is not listed
    got = doctor.check_templates(cfg)
    assert got.level == "OK" and got.detail.startswith(f"1 in {tmp_path}: abababababab (3 MiB")
    assert "2.0 h old" in got.detail
    off = Config(vm=VmConfig(template="off", template_dir=str(tmp_path)))
    assert "boots cold" in doctor.check_templates(off).detail


@pytest.mark.timeout(10)
def test_uefi_firmware_is_a_warning_when_missing(tmp_path: Path) -> None:
    code, vars_ = tmp_path / "CODE.fd", tmp_path / "VARS.fd"
    cfg = Config(vm=VmConfig(uefi_code=str(code), uefi_vars=str(vars_)))
    got = doctor.check_uefi(cfg)
    assert got.level == "WARN" and str(code) in got.detail and "apt-get install ovmf" in got.detail
    code.write_bytes(b"x")
    vars_.write_bytes(b"y")
    assert doctor.check_uefi(cfg).level == "OK"
