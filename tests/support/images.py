"""Build OCI / Docker images in memory for tests: layers from tar entries, busybox-static
root filesystems, multi-layer images with whiteouts, OCI indexes, gzip/zstd/plain layers.

Nothing here talks to a registry; see tests.support.registry for pushing.

    layer = busybox_rootfs()                       # a LayerBuilder
    img = build_image([build_layer(layer)])        # a BuiltImage (docker schema2)
    registry.push_image("library/busybox", "latest", img)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

BUSYBOX = Path("/bin/busybox")

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

FIXED_MTIME = 1_700_000_000

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
)
# app is a member of staff: a group only the image's /etc/group gives (SupplementalGroupsPolicy)
GROUP = "root:x:0:\nnobody:x:65534:\napp:x:1000:\nstaff:x:50:app\n"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class LayerBuilder:
    """Tar entries of one layer, in order (PAX format, so xattrs are kept)."""

    def __init__(self) -> None:
        self.members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def _info(self, path: str, kind: bytes, mode: int, uid: int, gid: int, mtime: float) -> Any:
        ti = tarfile.TarInfo(path)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.mtime = mtime
        return ti

    def raw(self, ti: tarfile.TarInfo, data: bytes | None = None) -> LayerBuilder:
        """Append an entry as is: no checks (for malicious layers)."""
        if data is not None:
            ti.size = len(data)
        self.members.append((ti, data))
        return self

    def dir(
        self,
        path: str,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime: float = FIXED_MTIME,
        xattrs: dict[str, bytes] | None = None,
    ) -> LayerBuilder:
        ti = self._info(path, tarfile.DIRTYPE, mode, uid, gid, mtime)
        self._xattrs(ti, xattrs)
        return self.raw(ti)

    def file(
        self,
        path: str,
        data: bytes | str = b"",
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: float = FIXED_MTIME,
        xattrs: dict[str, bytes] | None = None,
    ) -> LayerBuilder:
        ti = self._info(path, tarfile.REGTYPE, mode, uid, gid, mtime)
        self._xattrs(ti, xattrs)
        return self.raw(ti, data.encode() if isinstance(data, str) else data)

    def symlink(self, path: str, target: str, uid: int = 0, gid: int = 0) -> LayerBuilder:
        ti = self._info(path, tarfile.SYMTYPE, 0o777, uid, gid, FIXED_MTIME)
        ti.linkname = target
        return self.raw(ti)

    def hardlink(self, path: str, target: str) -> LayerBuilder:
        ti = self._info(path, tarfile.LNKTYPE, 0o644, 0, 0, FIXED_MTIME)
        ti.linkname = target
        return self.raw(ti)

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o666) -> LayerBuilder:
        ti = self._info(path, tarfile.CHRTYPE, mode, 0, 0, FIXED_MTIME)
        ti.devmajor, ti.devminor = major, minor
        return self.raw(ti)

    def fifo(self, path: str, mode: int = 0o644) -> LayerBuilder:
        return self.raw(self._info(path, tarfile.FIFOTYPE, mode, 0, 0, FIXED_MTIME))

    def whiteout(self, path: str) -> LayerBuilder:
        """Delete ``path`` of the layers below."""
        parent, _, name = path.rstrip("/").rpartition("/")
        return self.file(f"{parent}/.wh.{name}" if parent else f".wh.{name}")

    def opaque(self, directory: str) -> LayerBuilder:
        """Hide everything the layers below have in ``directory``."""
        return self.file(f"{directory.rstrip('/')}/.wh..wh..opq")

    @staticmethod
    def _xattrs(ti: tarfile.TarInfo, xattrs: dict[str, bytes] | None) -> None:
        if not xattrs:
            return
        headers = dict(ti.pax_headers)
        for k, v in xattrs.items():
            headers[f"SCHILY.xattr.{k}"] = v.decode("utf-8", "surrogateescape")
        ti.pax_headers = headers

    def tar(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for ti, data in self.members:
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def busybox_applets() -> list[str]:
    out = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    return [a for a in out.stdout.split() if a and "/" not in a and a != "busybox"]


def busybox_rootfs(lb: LayerBuilder | None = None) -> LayerBuilder:
    """A minimal root filesystem: /bin/busybox and its applets, users root, nobody, app."""
    lb = lb or LayerBuilder()
    for d, mode in (("bin", 0o755), ("sbin", 0o755), ("etc", 0o755), ("dev", 0o755),
                    ("proc", 0o555), ("sys", 0o555), ("run", 0o755), ("var", 0o755),
                    ("usr", 0o755), ("usr/bin", 0o755), ("root", 0o700), ("tmp", 0o1777),
                    ("home", 0o755)):  # fmt: skip
        lb.dir(d, mode)
    lb.dir("home/app", 0o755, uid=1000, gid=1000)
    lb.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in busybox_applets():
        lb.symlink(f"bin/{applet}", "busybox")
    lb.file("etc/passwd", PASSWD)
    lb.file("etc/group", GROUP)
    lb.file("etc/hostname", "busybox\n")
    return lb


@dataclass(frozen=True)
class BuiltLayer:
    blob: bytes
    media_type: str
    digest: str
    diff_id: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.blob)}


def compress(tar: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(tar, compresslevel=1, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(tar)
    if compression == "none":
        return tar
    raise ValueError(compression)


def build_layer(
    layer: LayerBuilder | bytes, compression: str = "gzip", oci: bool = False
) -> BuiltLayer:
    """Compress a layer; ``oci`` picks OCI media types (needed for zstd / plain)."""
    tar = layer.tar() if isinstance(layer, LayerBuilder) else layer
    blob = compress(tar, compression)
    if compression == "gzip":
        mt = OCI_LAYER_GZIP if oci else DOCKER_LAYER_GZIP
    elif compression == "zstd":
        mt = OCI_LAYER_ZSTD
    else:
        mt = OCI_LAYER
    return BuiltLayer(blob, mt, sha256(blob), sha256(tar))


@dataclass(frozen=True)
class BuiltImage:
    layers: list[BuiltLayer]
    config: bytes
    manifest: bytes
    manifest_media_type: str
    platform: dict[str, str] = field(default_factory=dict)

    @property
    def config_digest(self) -> str:
        """The image id."""
        return sha256(self.config)

    @property
    def manifest_digest(self) -> str:
        return sha256(self.manifest)

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mediaType": self.manifest_media_type,
            "digest": self.manifest_digest,
            "size": len(self.manifest),
        }
        if self.platform:
            d["platform"] = self.platform
        return d

    @property
    def size(self) -> int:
        return len(self.config) + len(self.manifest) + sum(len(x.blob) for x in self.layers)


def build_image(
    layers: list[BuiltLayer],
    *,
    oci: bool = False,
    architecture: str = "amd64",
    os: str = "linux",
    variant: str = "",
    config: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
) -> BuiltImage:
    """An image of ``layers``; ``config`` is merged into the config's ``config`` object
    (``User``, ``Cmd``, ``Env``, ``WorkingDir``...)."""
    inner: dict[str, Any] = {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["sh"],
    }
    inner.update(config or {})
    if labels:
        inner["Labels"] = labels
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "os": os,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(FIXED_MTIME)),
        "config": inner,
        "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in layers]},
        "history": [{"created_by": f"criv test layer {i}"} for i in range(len(layers))],
    }
    if variant:
        cfg["variant"] = variant
    config_bytes = json.dumps(cfg, sort_keys=True).encode()
    mt = OCI_MANIFEST if oci else DOCKER_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt,
        "config": {
            "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
            "digest": sha256(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [x.descriptor() for x in layers],
    }
    platform = {"architecture": architecture, "os": os}
    if variant:
        platform["variant"] = variant
    return BuiltImage(layers, config_bytes, json.dumps(manifest).encode(), mt, platform)


@dataclass(frozen=True)
class BuiltIndex:
    images: list[BuiltImage]
    body: bytes
    media_type: str
    extra: list[dict[str, Any]] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return sha256(self.body)


def build_index(
    images: list[BuiltImage], oci: bool = True, extra: list[dict[str, Any]] | None = None
) -> BuiltIndex:
    """A manifest list / OCI index of ``images``; ``extra`` descriptors are appended
    as given (e.g. attestation manifests with platform unknown/unknown)."""
    mt = OCI_INDEX if oci else DOCKER_MANIFEST_LIST
    doc = {
        "schemaVersion": 2,
        "mediaType": mt,
        "manifests": [i.descriptor() for i in images] + list(extra or []),
    }
    return BuiltIndex(images, json.dumps(doc).encode(), mt, list(extra or []))


# -- ready-made images --------------------------------------------------------------


def busybox_image(
    compression: str = "gzip", oci: bool = False, config: dict[str, Any] | None = None
) -> BuiltImage:
    """busybox-static in one layer: /bin/sh and friends work."""
    return build_image([build_layer(busybox_rootfs(), compression, oci)], oci=oci, config=config)


def whiteout_image(compression: str = "gzip") -> BuiltImage:
    """Three layers: busybox; /data/{a,b} and /opq/{x,y}; then /data/a whited out and
    /opq made opaque with only /opq/new. Merged: /data/b, /opq/new."""
    base = build_layer(busybox_rootfs(), compression, True)
    l1 = LayerBuilder().dir("data").file("data/a", "a\n").file("data/b", "b\n")
    l1.dir("opq").file("opq/x", "x\n").file("opq/y", "y\n")
    l2 = LayerBuilder().dir("data").whiteout("data/a").dir("opq").opaque("opq")
    l2.file("opq/new", "new\n")
    return build_image(
        [base, build_layer(l1, compression, True), build_layer(l2, compression, True)], oci=True
    )


def marker_image(arch: str, variant: str = "", compression: str = "gzip") -> BuiltImage:
    """A one-layer image holding /platform with ``arch[/variant]`` in it."""
    text = f"linux/{arch}" + (f"/{variant}" if variant else "") + "\n"
    lb = LayerBuilder().file("platform", text)
    return build_image(
        [build_layer(lb, compression, True)], oci=True, architecture=arch, variant=variant
    )


def multiarch_index() -> BuiltIndex:
    """An OCI index: arm64, arm/v6, arm/v7, amd64 (busybox + /platform), s390x, and an
    attestation manifest for unknown/unknown."""
    amd64_layers = [
        build_layer(busybox_rootfs(), "gzip", True),
        build_layer(LayerBuilder().file("platform", "linux/amd64\n"), "gzip", True),
    ]
    amd64 = build_image(amd64_layers, oci=True)
    images = [
        marker_image("arm64", "v8"),
        marker_image("arm", "v6"),
        marker_image("arm", "v7"),
        amd64,
        marker_image("s390x"),
    ]
    attestation = {
        "mediaType": OCI_MANIFEST,
        "digest": images[0].manifest_digest,
        "size": len(images[0].manifest),
        "platform": {"architecture": "unknown", "os": "unknown"},
    }
    return build_index(images, oci=True, extra=[attestation])


def random_layer(size: int, seed: int, compressible: bool, files: int = 8) -> LayerBuilder:
    """``size`` bytes spread over ``files`` files: random, or text-like (compressible)."""
    import random

    rng = random.Random(seed)
    lb = LayerBuilder().dir(f"data{seed}")
    per = size // files
    for i in range(files):
        if compressible:
            words = [
                rng.choice((b"alpha", b"beta", b"gamma", b"delta", b"criv")) for _ in range(64)
            ]
            chunk = b" ".join(words) + b"\n"
            data = (chunk * (per // len(chunk) + 1))[:per]
        else:
            data = rng.randbytes(per)
        lb.file(f"data{seed}/f{i}", data)
    return lb


# -- hostile raw tar (what tarfile will not write) ----------------------------------


def raw_tar_header(
    name: bytes, typeflag: bytes, size: int, extra: dict[int, bytes] | None = None
) -> bytes:
    """One 512-byte GNU tar header as a hostile writer makes it: any declared ``size``
    (base-256 past 8 GiB), ``extra`` bytes placed at the given offsets (sparse fields)."""
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    if size < 8**11:
        h[124:136] = b"%011o\0" % size
    else:
        h[124:136] = b"\x80" + size.to_bytes(11, "big")
    h[136:148] = b"%011o\0" % FIXED_MTIME
    h[156:157] = typeflag
    h[257:265] = b"ustar  \0"
    for off, data in (extra or {}).items():
        h[off : off + len(data)] = data
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def gzip_chunks(chunks: Iterable[bytes]) -> bytes:
    """gzip of the concatenated ``chunks``, without holding them all (for bombs)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as gz:
        for c in chunks:
            gz.write(c)
    return out.getvalue()


def zeros(n: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    block = bytes(chunk)
    while n > 0:
        yield block[: min(n, chunk)]
        n -= chunk
