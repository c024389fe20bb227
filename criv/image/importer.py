"""Import an image from a local OCI image layout into the store, as a pull would.

Used by `criv vm-image import` (through the daemon, which owns the store): the layout's
index, manifest, config and layers are checked like a registry's (digests verified while
copied, ``image_limits`` applied, layers unpacked by the same safe unpacker), then the
image is committed under the given reference exactly as a pulled one, so ListImages,
ImageStatus, RemoveImage and GC treat it the same.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

from criv.errors import ImageError, InvalidArgument
from criv.image.limits import ExpandBudget, check_blob_size, check_manifest
from criv.image.media import INDEX_TYPES, LAYER_TYPES, Descriptor, manifest_kind, parse_json
from criv.image.pull import PullResult
from criv.image.records import LayerRef
from criv.image.reference import Reference, parse_reference

if TYPE_CHECKING:
    from criv.image.manager import ImageManager

_CHUNK = 1 << 20
_MAX_INDEX = 1 << 20


def _blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def _read_small(path: Path, limit: int, what: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"{what}: cannot open {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ImageError(f"{what}: more than {limit} bytes")
    return data


def _copy_blob(m: ImageManager, layout: Path, desc: Descriptor, what: str) -> None:
    """Copy one blob into the content store; its digest and size are checked on commit."""
    if m.content.has(desc.digest):
        return
    w = m.content.writer(desc.digest, desc.size, what)
    try:
        fd = os.open(_blob_path(layout, desc.digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read(_CHUNK):
                w.write(chunk)
        w.commit()
    except BaseException:
        w.abort()
        raise


async def import_layout(m: ImageManager, layout: Path, ref: str) -> str:
    """Import the one image of the OCI layout at ``layout`` as ``ref``; return its id."""
    if not layout.is_absolute():
        raise InvalidArgument(f"image layout path {str(layout)!r} is not absolute")
    named = parse_reference(ref)
    what = f"image layout {layout}"
    try:
        return await _import(m, layout, named, what)
    except Exception:
        await m.gc()  # once the scope dropped its refs: a refused import keeps nothing
        raise


async def _import(m: ImageManager, layout: Path, named: Reference, what: str) -> str:
    limits = m.config.image_limits
    async with m._pull_scope():
        raw_index = await asyncio.to_thread(_read_small, layout / "index.json", _MAX_INDEX, what)
        entries = parse_json(raw_index, f"{what}: index.json").get("manifests")
        if not isinstance(entries, list) or len(entries) != 1:
            raise ImageError(f"{what}: index.json must name exactly one manifest")
        desc = Descriptor.from_json(entries[0], f"{what}: index.json")
        body = await asyncio.to_thread(
            _read_small, _blob_path(layout, desc.digest), limits.max_manifest_kib << 10, what
        )
        doc = parse_json(body, f"{what}: manifest")
        if manifest_kind(doc, desc.media_type) in INDEX_TYPES:
            raise ImageError(f"{what}: nested indexes are not supported")
        config = Descriptor.from_json(doc.get("config"), f"{what}: config")
        raw_layers = doc.get("layers")
        if not isinstance(raw_layers, list):
            raise ImageError(f"{what}: manifest has no layers")
        descs = [Descriptor.from_json(x, f"{what}: layer") for x in raw_layers]
        check_manifest(limits, what, config, descs)
        for d in descs:
            if d.media_type not in LAYER_TYPES:
                raise ImageError(f"{what}: unsupported layer media type {d.media_type!r}")
            check_blob_size(limits, f"{what}: layer {d.digest}", d.size)
        await m._keep_for_pull([desc.digest, config.digest, *(d.digest for d in descs)])
        await asyncio.to_thread(m.content.put, body, desc.digest)
        await asyncio.to_thread(_copy_blob, m, layout, config, f"{what}: config")
        cfg = parse_json(await asyncio.to_thread(m.content.read, config.digest), f"{what}: config")
        rootfs = cfg.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(descs):
            raise ImageError(f"{what}: rootfs.diff_ids do not match the layers")
        if not all(
            isinstance(x, str) and x.startswith("sha256:") and len(x) == 71 for x in diff_ids
        ):
            raise ImageError(f"{what}: bad diff id in the config")
        layers = [
            LayerRef(d.digest, d.media_type, d.size, str(x))
            for d, x in zip(descs, diff_ids, strict=True)
        ]
        await m._keep_for_pull(layer.diff_id for layer in layers)
        budget = ExpandBudget(limits, f"image {named}")
        for i, (layer, d) in enumerate(zip(layers, descs, strict=True)):
            lwhat = f"layer {i} ({d.digest}) of {what}"
            await asyncio.to_thread(_copy_blob, m, layout, d, lwhat)

            def charge(n: int, diff: str = layer.diff_id) -> None:
                budget.charge(diff, n)

            info = await asyncio.to_thread(
                m.layers.unpack, layer.diff_id, m.content.path(d.digest), lwhat, charge
            )
            budget.settle(layer.diff_id, info.expanded_bytes)
        result = PullResult(
            named, desc.digest, desc.digest, config.digest, config.size, len(body), layers, []
        )
        return await m._commit(result)
