"""Pick the manifest for our platform out of a manifest list / OCI index.

Matching follows containerd's platforms package: os and architecture must match
(after normalising aliases), and the variant is honoured: an exact variant wins, then
a lower compatible one (arm v7 runs v6 and v5; arm64 v8 default), then none.
"""

from __future__ import annotations

import platform as _pyplatform
from dataclasses import dataclass

from criv.errors import ImageError
from criv.image.media import Descriptor

_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armhf": "arm",
    "armel": "arm",
    "i386": "386",
    "i686": "386",
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return f"{s}/{self.variant}" if self.variant else s


def normalize(p: Platform) -> Platform:
    arch = _ARCH_ALIASES.get(p.architecture, p.architecture)
    variant = p.variant
    if arch == "arm64" and variant in ("8", "v8"):
        variant = ""
    elif arch == "arm" and variant in ("", "7"):
        variant = "v7"
    elif arch == "amd64" and variant == "v1":
        variant = ""
    elif variant.isdigit():
        variant = f"v{variant}"
    return Platform(p.os.lower(), arch, variant)


def host_platform() -> Platform:
    return normalize(Platform("linux", _pyplatform.machine().lower()))


def parse_platform(s: str) -> Platform:
    parts = s.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ImageError(f"invalid platform {s!r}")
    return normalize(Platform(*parts))


def _compatible_variants(p: Platform) -> list[str]:
    """Variants ``p`` can run, best first."""
    if p.architecture == "arm":
        n = int(p.variant[1:]) if p.variant[1:].isdigit() else 7
        return [f"v{i}" for i in range(n, 4, -1)]
    if p.architecture == "amd64":
        n = int(p.variant[1:]) if p.variant[1:].isdigit() else 1
        return [f"v{i}" for i in range(n, 1, -1)] + [""]
    if p.architecture == "arm64":
        return [""]
    return [p.variant] if p.variant else [""]


def select_manifest(manifests: list[Descriptor], want: Platform) -> Descriptor:
    """The best descriptor for ``want``; ImageError naming the platforms on offer if none."""
    want = normalize(want)
    variants = _compatible_variants(want)
    best: tuple[int, int] | None = None
    chosen: Descriptor | None = None
    for i, d in enumerate(manifests):
        plat = d.platform
        if not plat:
            continue
        os_ = str(plat.get("os", ""))
        arch = str(plat.get("architecture", ""))
        var = str(plat.get("variant", "") or "")
        p = normalize(Platform(os_, arch, var))
        if p.os != want.os or p.architecture != want.architecture:
            continue
        if p.variant not in variants:
            continue
        rank = (variants.index(p.variant), i)
        if best is None or rank < best:
            best, chosen = rank, d
    if chosen is None:
        offered = sorted(
            "/".join(
                x
                for x in (
                    str(d.platform.get("os", "")),
                    str(d.platform.get("architecture", "")),
                    str(d.platform.get("variant", "") or ""),
                )
                if x
            )
            for d in manifests
            if d.platform
        )
        raise ImageError(f"no manifest for platform {want} (index offers: {', '.join(offered)})")
    return chosen
