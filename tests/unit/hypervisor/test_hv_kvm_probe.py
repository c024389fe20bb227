from __future__ import annotations

import struct
from pathlib import Path

import pytest

from criv.hypervisor import kvm


@pytest.mark.timeout(10)
def test_probe_elf_has_a_pvh_note_pointing_at_the_code() -> None:
    elf = kvm.probe_elf()
    assert elf[:4] == b"\x7fELF" and elf[4] == 1  # ELF32
    phoff, phnum = struct.unpack_from("<I", elf, 28)[0], struct.unpack_from("<H", elf, 44)[0]
    phdrs = [struct.unpack_from("<IIIIIIII", elf, phoff + 32 * i) for i in range(phnum)]
    note = next(p for p in phdrs if p[0] == 4)
    namesz, descsz, ntype = struct.unpack_from("<III", elf, note[1])
    assert (namesz, descsz, ntype) == (4, 4, 18)  # XEN_ELFNOTE_PHYS32_ENTRY
    assert elf[note[1] + 12 : note[1] + 16] == b"Xen\0"
    entry = struct.unpack_from("<I", elf, note[1] + 16)[0]
    load = next(p for p in phdrs if p[0] == 1)
    code = elf[entry - load[2] :]
    assert code.startswith(b"\x66\xba\xf8\x03") and kvm.MARKER[:1] in code


def _fake(monkeypatch: pytest.MonkeyPatch, tiny: bool, guest: bool) -> list[str]:
    calls: list[str] = []

    def run_probe(
        accel: str,
        timeout: float = 5.0,
        kernel: Path | None = None,
        *a: object,
        root_disk: Path | None = None,
    ):  # type: ignore[no-untyped-def]
        calls.append(("guest" + (f" {root_disk.name}" if root_disk else "")) if kernel else "tiny")
        ok = guest if kernel else tiny
        return ok, "ran" if ok else "hangs", 0.1

    monkeypatch.setattr(kvm, "run_probe", run_probe)
    monkeypatch.setattr(kvm, "boot_id", lambda: "boot-1")
    monkeypatch.setattr(kvm, "kvm_node_problem", lambda: "")
    return calls


@pytest.mark.timeout(10)
def test_tcg_when_configured_without_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake(monkeypatch, True, True)
    assert kvm.choose_accel("tcg").accel == "tcg" and calls == []


@pytest.mark.timeout(10)
def test_nested_kvm_that_hangs_falls_back_to_tcg_and_is_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = _fake(monkeypatch, tiny=True, guest=False)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"x")
    cache = tmp_path / "probe.json"
    c = kvm.choose_accel("auto", cache, kernel, None)
    assert c.accel == "tcg" and "not the guest kernel" in c.reason
    assert calls == ["tiny", "guest"]
    again = kvm.choose_accel("auto", cache, kernel, None)
    assert again == c and calls == ["tiny", "guest"]  # cached for this boot
    monkeypatch.setattr(kvm, "boot_id", lambda: "boot-2")
    kvm.choose_accel("auto", cache, kernel, None)
    assert calls == ["tiny", "guest", "tiny", "guest"]  # new boot: probe again


@pytest.mark.timeout(10)
def test_kvm_when_the_guest_kernel_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake(monkeypatch, tiny=True, guest=True)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"x")
    assert kvm.choose_accel("auto", tmp_path / "p.json", kernel, None).accel == "kvm"
    # the guest probe boots the image with its root disk
    disk = tmp_path / "root.erofs"
    got = kvm.choose_accel("auto", None, kernel, tmp_path / "initrd", root_disk=disk)
    assert got.accel == "kvm" and calls == ["tiny", "guest", "tiny", "guest root.erofs"]


@pytest.mark.timeout(10)
def test_provisional_answer_is_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _fake(monkeypatch, tiny=True, guest=True)
    c = kvm.choose_accel("auto", tmp_path / "p.json")
    assert c.accel == "kvm" and "not yet verified" in c.reason
    assert not (tmp_path / "p.json").exists() and calls == ["tiny"]


@pytest.mark.timeout(10)
def test_forced_kvm_is_honoured_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake(monkeypatch, tiny=False, guest=False)
    c = kvm.choose_accel("kvm", tmp_path / "p.json")
    assert c.accel == "kvm" and "but" in c.reason
