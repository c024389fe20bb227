"""Platform selection in manifest lists / OCI indexes."""

from __future__ import annotations

from typing import Any

import pytest

from criv.errors import ImageError
from criv.image.media import Descriptor
from criv.image.platform import Platform, normalize, parse_platform, select_manifest


def desc(n: int, os: str, arch: str, variant: str = "") -> Descriptor:
    plat: dict[str, Any] = {"os": os, "architecture": arch}
    if variant:
        plat["variant"] = variant
    return Descriptor("application/vnd.oci.image.manifest.v1+json", f"sha256:{n:064x}", 1, plat)


INDEX = [
    desc(1, "unknown", "unknown"),
    desc(2, "linux", "arm64", "v8"),
    desc(3, "linux", "arm", "v6"),
    desc(4, "linux", "arm", "v7"),
    desc(5, "linux", "amd64"),
    desc(6, "windows", "amd64"),
    desc(7, "linux", "s390x"),
]


@pytest.mark.parametrize(
    ("want", "n"),
    [
        ("linux/amd64", 5),
        ("linux/x86_64", 5),
        ("linux/arm64", 2),
        ("linux/aarch64", 2),
        ("linux/arm64/v8", 2),
        ("linux/arm/v7", 4),
        ("linux/arm", 4),
        ("linux/arm/v6", 3),
        ("linux/s390x", 7),
    ],
)
def test_select(want: str, n: int) -> None:
    assert select_manifest(INDEX, parse_platform(want)).digest == f"sha256:{n:064x}"


def test_variant_fallback_and_preference() -> None:
    only_v6 = [desc(1, "linux", "arm", "v5"), desc(2, "linux", "arm", "v6")]
    assert select_manifest(only_v6, Platform("linux", "arm", "v7")).digest.endswith("2")
    with pytest.raises(ImageError):
        select_manifest([desc(1, "linux", "arm", "v7")], Platform("linux", "arm", "v6"))
    # amd64 v3 host runs v2 and baseline, preferring the higher
    amd = [desc(1, "linux", "amd64"), desc(2, "linux", "amd64", "v2")]
    assert select_manifest(amd, Platform("linux", "amd64", "v3")).digest.endswith("2")
    assert select_manifest(amd, Platform("linux", "amd64")).digest.endswith("1")


def test_no_match_names_offer() -> None:
    with pytest.raises(ImageError, match="linux/arm64"):
        select_manifest([desc(2, "linux", "arm64")], Platform("linux", "amd64"))


def test_normalize() -> None:
    assert normalize(Platform("Linux", "x86_64")) == Platform("linux", "amd64")
    assert normalize(Platform("linux", "aarch64", "8")) == Platform("linux", "arm64")
    assert normalize(Platform("linux", "arm")) == Platform("linux", "arm", "v7")
