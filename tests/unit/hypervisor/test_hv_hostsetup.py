from __future__ import annotations

from pathlib import Path

import pytest

from criv.hypervisor.hostsetup import ensure_qemu_conf, qemu_conf_issues, root_propagation


@pytest.mark.timeout(10)
def test_ensure_qemu_conf_sets_an_unprivileged_user_once(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text(
        '#user = "libvirt-qemu"\ngroup = "kvm"\nnamespaces = []\nvnc_listen = "0.0.0.0"\n'
    )
    assert qemu_conf_issues(conf) == [
        'user = (default libvirt-qemu) (want "criv-qemu")',
        'group = "kvm" (want "criv-qemu")',
        'namespaces = [] (want ["mount"])',
        "dynamic_ownership = (default 1) (want 0)",
    ]
    assert ensure_qemu_conf(conf) is True
    assert qemu_conf_issues(conf) == []
    text = conf.read_text()
    assert '#user = "libvirt-qemu"' in text and 'vnc_listen = "0.0.0.0"' in text
    assert ensure_qemu_conf(conf) is False


def test_root_propagation_from_mountinfo(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n")
    assert root_propagation(mi) == "private"
    mi.write_text("27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n")
    assert root_propagation(mi) == "shared"
    mi.write_text("27 1 254:0 / / rw master:3 - ext4 /dev/vda rw\n")
    assert root_propagation(mi) == "slave"
