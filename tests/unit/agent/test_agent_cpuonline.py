"""The agent onlines vCPUs the host hot-plugs (a guest has no udev)."""

from __future__ import annotations

from pathlib import Path

import pytest

from criv_agent.cpuonline import is_cpu_add, online_all


def _cpu(root: Path, n: int, online: str | None) -> Path:
    d = root / f"cpu{n}"
    d.mkdir()
    if online is not None:
        (d / "online").write_text(online + "\n")
    return d


@pytest.mark.timeout(10)
def test_online_all_onlines_only_offline_vcpus(tmp_path: Path) -> None:
    _cpu(tmp_path, 0, None)  # cpu0: no online file
    _cpu(tmp_path, 1, "1")
    c2 = _cpu(tmp_path, 2, "0")
    (tmp_path / "cpufreq").mkdir()  # not a vCPU
    assert online_all(tmp_path) == [2]
    assert (c2 / "online").read_text() == "1"
    assert online_all(tmp_path) == []


@pytest.mark.timeout(10)
def test_uevent_parsing() -> None:
    add = (
        b"add@/devices/system/cpu/cpu1\0ACTION=add\0DEVPATH=/devices/system/cpu/cpu1\0"
        b"SUBSYSTEM=cpu\0SEQNUM=9\0"
    )
    assert is_cpu_add(add)
    assert not is_cpu_add(add.replace(b"ACTION=add", b"ACTION=online"))
    assert not is_cpu_add(b"add@/devices/virtual/net/x\0ACTION=add\0SUBSYSTEM=net\0")
    assert not is_cpu_add(b"libudev\0garbage")
    assert not is_cpu_add(b"")
