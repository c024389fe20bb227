"""The pull flow: resolve the reference, pick the platform, fetch config and layers into
the content store, unpack each layer once. Shared work is single-flight: concurrent
pulls of one reference share one pull, and pulls of different references share each
blob download (keyed by digest) and each unpack (keyed by diff id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from criv import metrics
from criv.config import ImageLimitsConfig
from criv.errors import ImageError
from criv.image.auth import Credentials
from criv.image.content import ContentStore
from criv.image.layers import LayerStore
from criv.image.limits import ExpandBudget, check_manifest
from criv.image.media import INDEX_TYPES, LAYER_TYPES, Descriptor, manifest_kind, parse_json
from criv.image.platform import Platform, select_manifest
from criv.image.records import LayerRef
from criv.image.reference import Reference
from criv.image.registry import Endpoint, RegistryClient

log = logging.getLogger(__name__)

T = TypeVar("T")
LAYER_CONCURRENCY = 4


class SingleFlight(Generic[T]):
    """Run one task per key; later callers await the same task.

    The task is shielded: a caller that gives up (deadline, cancel) does not cancel
    the work the other callers share.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[T]] = {}

    def running(self) -> int:
        return len(self._tasks)

    async def do(self, key: str, fn: Callable[[], Awaitable[T]]) -> T:
        task = self._tasks.get(key)
        if task is None:

            async def run() -> T:
                return await fn()

            task = asyncio.create_task(run(), name=f"criv-image:{key}")
            self._tasks[key] = task

            def done(t: asyncio.Task[T], key: str = key) -> None:
                if self._tasks.get(key) is t:
                    del self._tasks[key]
                if not t.cancelled():
                    t.exception()  # retrieved: callers see it

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class PullResult:
    ref: Reference
    top_digest: str  # what the reference resolved to (index or manifest)
    manifest_digest: str
    config_digest: str
    config_size: int
    manifest_size: int
    layers: list[LayerRef]
    extra_blobs: list[str]


class Puller:
    def __init__(
        self,
        content: ContentStore,
        layers: LayerStore,
        client: RegistryClient,
        platform: Platform,
        keep: Callable[[Iterable[str]], Awaitable[None]],
        limits: ImageLimitsConfig | None = None,
    ) -> None:
        self.limits = limits or ImageLimitsConfig()
        self.content = content
        self.layers = layers
        self.client = client
        self.platform = platform
        self._keep = keep  # registers digests and diff ids GC must keep (caller releases)
        self.blob_flights: SingleFlight[None] = SingleFlight()
        self.unpack_flights: SingleFlight[None] = SingleFlight()

    async def _blob(
        self, ref: Reference, desc: Descriptor, creds: Credentials | None, eps: list[Endpoint]
    ) -> None:
        if await asyncio.to_thread(self.content.has, desc.digest):
            return

        async def fetch() -> None:
            if await asyncio.to_thread(self.content.has, desc.digest):
                return
            what = f"blob {desc.digest} of {ref.repository}"
            await self.client.fetch_blob(
                ref,
                desc.digest,
                creds,
                lambda: self.content.writer(desc.digest, desc.size, what),
                eps,
            )
            metrics.IMAGE_PULL_BYTES.inc(desc.size)  # the writer checked size and digest

        await self.blob_flights.do(desc.digest, fetch)

    async def _layer(
        self, ref: Reference, layer: LayerRef, index: int, budget: ExpandBudget
    ) -> None:
        def charge(n: int) -> None:
            budget.charge(layer.diff_id, n)

        async def unpack() -> None:
            what = f"layer {index} ({layer.digest}) of {ref}"
            blob = self.content.path(layer.digest)
            info = await asyncio.to_thread(self.layers.unpack, layer.diff_id, blob, what, charge)
            log.info("unpacked %s: %d bytes, %d inodes", what, info.usage_bytes, info.inodes)

        info = await asyncio.to_thread(self.layers.get, layer.diff_id)
        if info is None:
            await self.unpack_flights.do(layer.diff_id, unpack)
            info = await asyncio.to_thread(self.layers.get, layer.diff_id)
        if info is not None:  # one already there, or unpacked by another pull
            budget.settle(layer.diff_id, info.expanded_bytes)

    async def pull(self, ref: Reference, creds: Credentials | None) -> PullResult:
        """Fetch and unpack everything ``ref`` needs; leases everything it touches."""
        body, ctype, top_digest, ep = await self.client.get_manifest(ref, ref.reference, creds)
        eps = [ep] + [e for e in self.client.endpoints(ref.domain) if e != ep]
        await self._keep([top_digest])
        extra: list[str] = []
        doc = parse_json(body, f"manifest of {ref}")
        kind = manifest_kind(doc, ctype)
        manifest_digest, manifest_body = top_digest, body
        if kind in INDEX_TYPES:
            await asyncio.to_thread(self.content.put, body, top_digest)
            extra.append(top_digest)
            entries = doc.get("manifests")
            if not isinstance(entries, list):
                raise ImageError(f"index of {ref}: no manifests")
            descs = [Descriptor.from_json(m, f"index of {ref}") for m in entries]
            chosen = select_manifest(descs, self.platform)
            manifest_body, ctype, manifest_digest, _ = await self.client.get_manifest(
                ref, chosen.digest, creds, eps
            )
            await self._keep([manifest_digest])
            doc = parse_json(manifest_body, f"manifest {chosen.digest} of {ref}")
            if manifest_kind(doc, ctype) in INDEX_TYPES:
                raise ImageError(f"{ref}: nested indexes are not supported")
        what = f"manifest {manifest_digest} of {ref}"
        config = Descriptor.from_json(doc.get("config"), f"{what}: config")
        raw_layers = doc.get("layers")
        if not isinstance(raw_layers, list):
            raise ImageError(f"{what}: no layers")
        layer_descs = [Descriptor.from_json(x, f"{what}: layer") for x in raw_layers]
        check_manifest(self.limits, what, config, layer_descs)  # before anything is fetched
        for d in layer_descs:
            if d.media_type not in LAYER_TYPES:
                raise ImageError(f"{what}: unsupported layer media type {d.media_type!r}")
        await asyncio.to_thread(self.content.put, manifest_body, manifest_digest)
        await self._keep([config.digest, *(d.digest for d in layer_descs)])

        await self._blob(ref, config, creds, eps)
        cfg = parse_json(
            await asyncio.to_thread(self.content.read, config.digest), f"config of {ref}"
        )
        rootfs = cfg.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layer_descs):
            raise ImageError(f"config of {ref}: rootfs.diff_ids do not match the layers")
        for d in diff_ids:
            if not isinstance(d, str) or not d.startswith("sha256:") or len(d) != 71:
                raise ImageError(f"config of {ref}: bad diff id {d!r}")
        layers = [
            LayerRef(x.digest, x.media_type, x.size, str(diff))
            for x, diff in zip(layer_descs, diff_ids, strict=True)
        ]
        await self._keep(layer.diff_id for layer in layers)

        sem = asyncio.Semaphore(LAYER_CONCURRENCY)
        budget = ExpandBudget(self.limits, f"image {ref}")

        async def one(i: int, layer: LayerRef, desc: Descriptor) -> None:
            async with sem:
                await self._blob(ref, desc, creds, eps)
            await self._layer(ref, layer, i, budget)

        results: list[Any] = await asyncio.gather(
            *(
                one(i, layer, d)
                for i, (layer, d) in enumerate(zip(layers, layer_descs, strict=True))
            ),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return PullResult(
            ref,
            top_digest,
            manifest_digest,
            config.digest,
            config.size,
            len(manifest_body),
            layers,
            extra,
        )
