"""Media types, digests and the small JSON documents of the OCI / Docker image formats."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from criv.errors import ImageError

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_TYPES = (DOCKER_MANIFEST_LIST, OCI_INDEX)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
LAYER_TYPES = (
    DOCKER_LAYER_GZIP,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_LAYER_ND,
    OCI_LAYER_ND_GZIP,
    OCI_LAYER_ND_ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar",
)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_hex(digest: str) -> str:
    return digest.split(":", 1)[1]


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = None
    annotations: dict[str, str] | None = None

    @classmethod
    def from_json(cls, d: Any, what: str) -> Descriptor:
        if not isinstance(d, dict):
            raise ImageError(f"{what}: descriptor is not an object")
        digest, size, mt = d.get("digest"), d.get("size"), d.get("mediaType", "")
        if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
            raise ImageError(f"{what}: unsupported or missing digest {digest!r}")
        try:
            int(digest[7:], 16)
        except ValueError:
            raise ImageError(f"{what}: bad digest {digest!r}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{what}: bad size {size!r}")
        if not isinstance(mt, str):
            raise ImageError(f"{what}: bad mediaType {mt!r}")
        plat = d.get("platform")
        ann = d.get("annotations")
        return cls(
            mt,
            digest,
            size,
            plat if isinstance(plat, dict) else None,
            ann if isinstance(ann, dict) else None,
        )


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{what}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: not a JSON object")
    return doc


def manifest_kind(doc: dict[str, Any], content_type: str) -> str:
    """Which of MANIFEST_TYPES / INDEX_TYPES a manifest document is."""
    mt = doc.get("mediaType") or content_type.split(";")[0].strip()
    if mt in MANIFEST_TYPES or mt in INDEX_TYPES:
        return str(mt)
    if mt == DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise ImageError("Docker schema 1 manifests are not supported")
    # OCI allows mediaType to be absent: tell by shape.
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc and "config" in doc:
        return OCI_MANIFEST
    raise ImageError(f"unsupported manifest media type {mt!r}")
