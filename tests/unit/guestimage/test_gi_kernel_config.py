from __future__ import annotations

from pathlib import Path

import pytest

from criv.guestimage.kernel import missing_options, parse_config

FRAGMENT = Path(__file__).resolve().parents[3] / "images/kernel/criv.config"


@pytest.mark.timeout(10)
def test_parse_config() -> None:
    text = '# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=64\nCONFIG_D="x y"\n'
    assert parse_config(text) == {
        "CONFIG_A": "y",
        "CONFIG_B": "n",
        "CONFIG_C": "64",
        "CONFIG_D": '"x y"',
    }


@pytest.mark.timeout(10)
def test_missing_options_lists_every_dropped_setting() -> None:
    fragment = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_N=8\n"
    final = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_N=8\n"
    assert missing_options(fragment, final) == ["CONFIG_B=y (got n)", "CONFIG_C=n (got y)"]
    # an option absent from the final config reads as "n"
    assert missing_options("CONFIG_X=y\n", "") == ["CONFIG_X=y (got n)"]
    assert missing_options("# CONFIG_X is not set\n", "") == []


@pytest.mark.timeout(10)
def test_fragment_has_what_the_guest_needs() -> None:
    want = parse_config(FRAGMENT.read_text())
    for opt in (
        "PVH",
        "VIRTIO_PCI",
        "VIRTIO_MMIO",
        "VIRTIO_VSOCKETS",
        "HW_RANDOM_VIRTIO",
        "NET_9P_VIRTIO",
        "9P_FS",
        "EROFS_FS",
        "OVERLAY_FS",
        "EXT4_FS",
        "CGROUPS",
        "MEMCG",
        "CGROUP_BPF",
        "USER_NS",
        "SECCOMP_FILTER",
        "BLK_DEV_INITRD",
        "SERIAL_8250_CONSOLE",
        "UNIX98_PTYS",
    ):
        assert want.get(f"CONFIG_{opt}") == "y", opt
    assert want.get("CONFIG_MODULES") == "n"
