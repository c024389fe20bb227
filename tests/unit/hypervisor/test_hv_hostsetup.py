from __future__ import annotations

from pathlib import Path

import pytest

from criv.hypervisor.hostsetup import ensure_qemu_conf, qemu_conf_issues


@pytest.mark.timeout(10)
def test_ensure_qemu_conf_sets_root_once(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('#user = "libvirt-qemu"\ngroup = "kvm"\nvnc_listen = "0.0.0.0"\n')
    assert qemu_conf_issues(conf) == [
        'user = (default libvirt-qemu) (want "root")',
        'group = "kvm" (want "root")',
        'namespaces = (default ["mount"]) (want [])',
    ]
    assert ensure_qemu_conf(conf) is True
    assert qemu_conf_issues(conf) == []
    text = conf.read_text()
    assert '#user = "libvirt-qemu"' in text and 'vnc_listen = "0.0.0.0"' in text
    assert ensure_qemu_conf(conf) is False
