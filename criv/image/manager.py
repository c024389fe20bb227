"""ImageManager: the image store's facade for the CRI servicer and the sandbox code.

Layout under ``<state_dir>/images/``: ``blobs/sha256/`` (content), ``layers/<diff>/``
(unpacked layers), ``records/`` (one JSON per image), ``leases/`` (one JSON per
container using layers), ``tmp/`` and ``trash/``. See docs/image-store.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import errno
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from criv import metrics
from criv.config import Config
from criv.errors import (
    CrivError,
    ImageLimitExceeded,
    ImageNotFound,
    ResourceExhausted,
    UnsafeLayer,
)
from criv.image.auth import Credentials
from criv.image.content import ContentStore, private_dir
from criv.image.layers import LayerStore
from criv.image.leases import Lease, LeaseStore, check_holder
from criv.image.platform import Platform, host_platform
from criv.image.pull import Puller, PullResult, SingleFlight
from criv.image.records import ImageIndex, ImageRecord, RecordStore
from criv.image.reference import parse_reference
from criv.image.registry import RegistryClient

log = logging.getLogger(__name__)

__all__ = ["Credentials", "FsUsage", "ImageManager", "StoredImage"]

_RECORD_BYTES = 4096  # a record file's footprint, for usage accounting

# The keys the current pull added to _pull_refs (set per pull task, shared by its
# child tasks), taken out again when the pull ends.
_PULL_KEYS: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "criv_image_pull_keys", default=None
)


@dataclass(frozen=True)
class FsUsage:
    mountpoint: str
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


@dataclass(frozen=True)
class StoredImage:
    id: str
    repo_tags: list[str]
    repo_digests: list[str]
    size: int
    config: dict[str, Any]
    config_json: bytes
    layer_dirs: list[Path]  # lowest first: overlay lowerdir wants them reversed
    user: str
    pinned: bool = False
    layers: list[str] = field(default_factory=list)  # diff ids, lowest first


class ImageManager:
    def __init__(self, config: Config, platform: Platform | None = None) -> None:
        self.config = config
        self.root = Path(config.state_dir) / "images"
        self.content = ContentStore(self.root)
        self.layers = LayerStore(self.root, config.image_limits)
        self.records = RecordStore(self.root)
        self.index = ImageIndex()
        self.client = RegistryClient(config.registries, config.image_limits)
        self.platform = platform or host_platform()
        self._lock = asyncio.Lock()  # records, index, leases and GC decisions
        # digest / diff id -> how many in-flight pulls use it (memory only): GC keeps them
        self._pull_refs: collections.Counter[str] = collections.Counter()
        # layers each container (holder) uses: lease files and their copy in memory
        self.container_leases = LeaseStore(self.root)
        self._pulls: SingleFlight[str] = SingleFlight()
        self._blob_usage: dict[str, int] = {}
        self._layer_usage: dict[str, tuple[int, int]] = {}
        self._configs: dict[str, bytes] = {}
        self.puller = Puller(self.content, self.layers, self.client, self.platform,
                             self._keep_for_pull, config.image_limits)  # fmt: skip

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        def setup() -> list[tuple[ImageRecord, bytes | None]]:
            private_dir(self.root)  # created 0700, or an older store's 0755 tightened
            # container leases load before the GC below: what they hold must survive it
            for part in (self.content, self.layers, self.records, self.container_leases):
                part.setup()
            out: list[tuple[ImageRecord, bytes | None]] = []
            for rec in self.records.load_all():
                try:
                    out.append((rec, self.content.read(rec.config_digest)))
                except OSError:
                    out.append((rec, None))
            return out

        for rec, raw in await asyncio.to_thread(setup):
            if raw is None:
                log.error("image %s: config blob missing, record dropped", rec.id)
                await asyncio.to_thread(self.records.delete, rec.id)
                continue
            self._configs[rec.config_digest] = raw
            self.index.put(rec)
        await self.client.start()
        await self.gc()
        await self._refresh_usage()
        log.info("image store %s: %d images", self.root, len(self.index.by_id))

    async def close(self) -> None:
        await self._pulls.cancel_all()
        await self.puller.blob_flights.cancel_all()
        await self.puller.unpack_flights.cancel_all()
        await self.client.close()

    # -- holder leases: layers a container's rootfs uses, kept from GC ------------

    async def acquire(self, ref: str, holder: str) -> StoredImage:
        """Lease ``ref``'s layers for ``holder`` and return the image.

        Resolved under the store lock, so the image returned is one whose layers GC
        cannot take from now on, even if the image is removed before the caller mounts
        them. A holder has one lease: acquiring again replaces it (idempotent retry).
        """
        check_holder(holder)
        async with self._lock:
            rec, _ = self.index.resolve(ref)
            if rec is None:
                raise ImageNotFound(f"image {ref!r} not found")
            img = self._stored(rec)
            lease = Lease(holder, rec.id, tuple(img.layers), time.time_ns())
            # replacing an unreadable lease lifts its hold on every layer
            collect = holder in self.container_leases.unreadable
            old = await self.container_leases.put(lease)
            if old is not None:
                collect = collect or bool(set(old.layers) - self._referenced())
        if collect:
            await self._gc_after_release()
        return img

    async def release(self, holder: str) -> None:
        """Drop ``holder``'s lease (a no-op if it has none); layers that nothing else
        references any more are collected now."""
        await self.release_many([holder])

    async def release_many(self, holders: Iterable[str]) -> None:
        freed: set[str] = set()
        collect = False
        async with self._lock:
            for h in holders:
                if h not in self.container_leases.holders():
                    continue
                collect = collect or h in self.container_leases.unreadable
                # file first: if it cannot go, the lease is still held here and on disk
                lease = await self.container_leases.drop(h)
                if lease is not None:
                    freed |= set(lease.layers)
            # common case (the image is still there): nothing to collect, skip the scan
            collect = collect or bool(freed - self._referenced())
        if collect:
            await self._gc_after_release()

    def lease_holders(self) -> set[str]:
        """Every holder with a lease on disk (readable or not), for recovery."""
        return self.container_leases.holders()

    def lease_of(self, holder: str) -> Lease | None:
        return self.container_leases.by_holder.get(holder)

    def _referenced(self) -> set[str]:
        """Keys (digests, diff ids) GC must keep: records, pulls, leases (lock held)."""
        keep: set[str] = set(self._pull_refs) | self.container_leases.layers()
        for rec in self.index.by_id.values():
            keep |= rec.blobs()
            keep |= {layer.diff_id for layer in rec.layers}
        return keep

    async def _gc_after_release(self) -> None:
        # The lease is gone either way; a failed sweep is retried by the next GC and
        # must not fail the container removal that released it.
        try:
            await self.gc()
        except OSError as e:
            log.error("image gc after a lease release failed: %s", e)

    # -- pull refs: what an in-flight pull uses, kept from GC ---------------------

    async def _keep_for_pull(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        async with self._lock:
            mine = _PULL_KEYS.get()
            if mine is None:
                raise RuntimeError("pull ref outside a pull")
            for k in keys:
                self._pull_refs[k] += 1
                mine.append(k)

    @asynccontextmanager
    async def _pull_scope(self) -> AsyncIterator[list[str]]:
        mine: list[str] = []
        token = _PULL_KEYS.set(mine)
        try:
            yield mine
        finally:
            _PULL_KEYS.reset(token)
            for k in mine:
                self._pull_refs[k] -= 1
                if self._pull_refs[k] <= 0:
                    del self._pull_refs[k]

    # -- pull ---------------------------------------------------------------------

    async def pull(self, ref: str, auth: Credentials | None = None) -> str:
        """Pull ``ref``; returns the image id (``sha256:`` config digest)."""
        named = parse_reference(ref)
        key = str(named)
        if auth is not None and not auth.is_empty():
            # different credentials may see different things: do not share
            key += f"#{id(auth)}"

        async def run() -> str:
            try:
                async with self._pull_scope():
                    return await self._commit(await self.puller.pull(named, auth))
            except (ImageLimitExceeded, UnsafeLayer):
                # once its refs are dropped: a refused image keeps nothing (a retry of an
                # unsafe layer fails again; its blobs are not worth keeping)
                await self.gc()
                raise
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ResourceExhausted(
                        f"pull of {named}: image store {self.root}: {e.strerror}"
                    ) from e
                raise

        return await self._pulls.do(key, lambda: metrics.timed_pull(run()))

    async def _commit(self, r: PullResult) -> str:
        image_id = r.config_digest
        tag = r.ref.tagged()
        repo_digest = r.ref.with_digest(r.top_digest)
        size = r.config_size + r.manifest_size + sum(layer.size for layer in r.layers)
        raw_config = await asyncio.to_thread(self.content.read, r.config_digest)
        async with self._lock:
            changed: list[ImageRecord] = []
            if tag:
                other = self.index.by_tag(tag)
                if other is not None and other.id != image_id:
                    changed.append(other.untagged(tag))  # the tag moves to this image
            rec = self.index.by_id.get(image_id) or ImageRecord(
                id=image_id,
                repo_tags=(),
                repo_digests=(),
                manifest_digest=r.manifest_digest,
                config_digest=r.config_digest,
                layers=tuple(r.layers),
                size=size,
            )
            changed.append(rec.named(tag, repo_digest, r.extra_blobs))
            for c in changed:  # each published as soon as it is on disk
                await self._save(c)
            self._configs[r.config_digest] = raw_config  # no await since the last put
        await self._refresh_usage()
        log.info("pulled %s as %s", r.ref, image_id)
        return image_id

    async def _save(self, rec: ImageRecord) -> None:
        """Write ``rec``, then publish it: a failed write leaves the index as it was."""
        await asyncio.to_thread(self.records.save, rec)
        self.index.put(rec)

    # -- queries ------------------------------------------------------------------

    def _stored(self, rec: ImageRecord) -> StoredImage:
        raw = self._configs[rec.config_digest]  # loaded at start / pull, never on the loop
        cfg = json.loads(raw)
        inner = cfg.get("config") if isinstance(cfg.get("config"), dict) else {}
        user = inner.get("User", "") if isinstance(inner, dict) else ""
        return StoredImage(
            id=rec.id,
            repo_tags=list(rec.repo_tags),
            repo_digests=list(rec.repo_digests),
            size=rec.size,
            config=cfg,
            config_json=raw,
            layer_dirs=[self.layers.fs(layer.diff_id) for layer in rec.layers],
            user=user if isinstance(user, str) else "",
            pinned=rec.pinned,
            layers=[layer.diff_id for layer in rec.layers],
        )

    def list(self, filter_ref: str | None = None) -> list[StoredImage]:
        if not filter_ref:
            return [self._stored(r) for r in self.index.all()]
        rec, _ = self.index.resolve(filter_ref)
        if rec is not None:
            return [self._stored(rec)]
        # a bare repository name matches every tag of it
        try:
            named = parse_reference(filter_ref, default_tag=False)
        except CrivError:
            return []
        if named.tag or named.digest:
            return []
        prefix = named.repository + ":"
        return [
            self._stored(r)
            for r in self.index.all()
            if any(t.startswith(prefix) for t in r.repo_tags)
        ]

    def status(self, ref: str) -> StoredImage | None:
        rec, _ = self.index.resolve(ref)
        return self._stored(rec) if rec is not None else None

    def get(self, ref: str) -> StoredImage:
        img = self.status(ref)
        if img is None:
            raise ImageNotFound(f"image {ref!r} not found")
        return img

    # -- removal and GC -----------------------------------------------------------

    async def remove(self, ref: str) -> None:
        """Remove by id, tag or digest; one tag of a multi-tag image only untags."""
        async with self._lock:
            rec, how = self.index.resolve(ref)
            if rec is None:
                return
            if how == "tag" and len(rec.repo_tags) > 1:
                await self._save(rec.untagged(str(parse_reference(ref))))
                return
            await asyncio.to_thread(self.records.delete, rec.id)
            self.index.drop(rec.id)
            users = [h for h, x in self.container_leases.by_holder.items() if x.image_id == rec.id]
            if users:
                log.info(
                    "image %s removed; its layers stay until %d container(s) using them go",
                    rec.id,
                    len(users),
                )
            if not any(r.config_digest == rec.config_digest for r in self.index.by_id.values()):
                self._configs.pop(rec.config_digest, None)
        await self.gc()

    async def gc(self) -> None:
        """Delete blobs and layer dirs that no image record, pull or lease references."""
        async with self._lock:
            keep = self._referenced()
            # an unreadable lease may hold any layer: collect none until it is released
            keep_layers = bool(self.container_leases.unreadable)

            def sweep() -> tuple[int, int]:
                blobs = self.content.list() - keep
                for d in blobs:
                    self.content.delete(d)
                layers = [
                    x for x in self.layers.list() if x.diff_id not in keep and not keep_layers
                ]
                for x in layers:
                    self.layers.remove(x.diff_id)
                return len(blobs), len(layers)

            nblobs, nlayers = await asyncio.to_thread(sweep)
        if nblobs or nlayers:
            log.info("image gc: removed %d blobs, %d layers", nblobs, nlayers)
        await self._refresh_usage()

    # -- usage --------------------------------------------------------------------

    async def _refresh_usage(self) -> None:
        def scan() -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
            blobs = {d: self.content.usage(d) for d in self.content.list()}
            layers = {x.diff_id: (x.usage_bytes, x.inodes) for x in self.layers.list()}
            return blobs, layers

        self._blob_usage, self._layer_usage = await asyncio.to_thread(scan)

    def fs_info(self) -> FsUsage:
        """Bytes and inodes the store uses (du-style accounting kept up to date)."""
        used = sum(self._blob_usage.values()) + sum(b for b, _ in self._layer_usage.values())
        inodes = len(self._blob_usage) + sum(i for _, i in self._layer_usage.values())
        records = len(self.index.by_id) + len(self.container_leases.by_holder)
        used += _RECORD_BYTES * (records + 9)  # records, leases and the store's dirs
        inodes += records + 9
        return FsUsage(str(self.root), used, inodes, time.time_ns())
