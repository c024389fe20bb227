"""Image records: one versioned JSON file per image id, and the in-memory index.

``<state_dir>/images/records/<id-hex>.json``, written atomically (write, fsync,
rename). The index answers lookups by id, id prefix, repo tag and repo digest.

Records are immutable: a change builds a new record (``dataclasses.replace``), saves
it, and only then puts it in the index, so memory never runs ahead of the disk.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from criv.atomicfile import unlink_durable, write_atomic
from criv.errors import CrivError, ImageError
from criv.image.content import private_dir
from criv.image.media import digest_hex
from criv.image.reference import is_hex_id, is_sha256_digest, parse_reference

log = logging.getLogger(__name__)

RECORD_VERSION = 1


@dataclass(frozen=True)
class LayerRef:
    digest: str  # compressed blob
    media_type: str
    size: int
    diff_id: str


@dataclass(frozen=True)
class ImageRecord:
    id: str  # config digest
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    manifest_digest: str
    config_digest: str
    layers: tuple[LayerRef, ...]
    size: int
    pinned: bool = False
    extra_blobs: tuple[str, ...] = ()  # index / manifest blobs
    version: int = RECORD_VERSION

    def blobs(self) -> set[str]:
        return {self.config_digest, self.manifest_digest, *self.extra_blobs} | {
            layer.digest for layer in self.layers
        }

    def named(self, tag: str | None, repo_digest: str, extra_blobs: Iterable[str]) -> ImageRecord:
        """This record with ``tag``, ``repo_digest`` and ``extra_blobs`` added."""
        return replace(
            self,
            repo_tags=_added(self.repo_tags, [tag] if tag else []),
            repo_digests=_added(self.repo_digests, [repo_digest]),
            extra_blobs=_added(self.extra_blobs, extra_blobs),
        )

    def untagged(self, tag: str) -> ImageRecord:
        return replace(self, repo_tags=tuple(t for t in self.repo_tags if t != tag))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ImageRecord:
        d: dict[str, Any] = json.loads(data)
        if d.get("version") != RECORD_VERSION:
            raise ImageError(f"unsupported image record version {d.get('version')!r}")
        d["layers"] = tuple(LayerRef(**x) for x in d["layers"])
        for k in ("repo_tags", "repo_digests", "extra_blobs"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _added(have: tuple[str, ...], new: Iterable[str]) -> tuple[str, ...]:
    """``have`` then each of ``new`` it lacks, in order."""
    out = list(have)
    for x in new:
        if x not in out:
            out.append(x)
    return tuple(out)


class RecordStore:
    """The record files (blocking methods)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "records"

    def setup(self) -> None:
        private_dir(self.dir)

    def load_all(self) -> list[ImageRecord]:
        out = []
        for p in sorted(self.dir.iterdir()):
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                continue
            if not p.name.endswith(".json"):
                continue
            try:
                out.append(ImageRecord.from_json(p.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError, ImageError) as e:
                log.error("image record %s unreadable, ignored: %s", p, e)
        return out

    def save(self, rec: ImageRecord) -> None:
        write_atomic(self.dir / f"{digest_hex(rec.id)}.json", rec.to_json())

    def delete(self, image_id: str) -> None:
        unlink_durable(self.dir / f"{digest_hex(image_id)}.json")


class ImageIndex:
    """In-memory lookups over the records (the records are the truth)."""

    def __init__(self) -> None:
        self.by_id: dict[str, ImageRecord] = {}

    def put(self, rec: ImageRecord) -> None:
        self.by_id[rec.id] = rec

    def drop(self, image_id: str) -> None:
        self.by_id.pop(image_id, None)

    def all(self) -> list[ImageRecord]:
        return sorted(self.by_id.values(), key=lambda r: r.id)

    def by_tag(self, tag: str) -> ImageRecord | None:
        for r in self.by_id.values():
            if tag in r.repo_tags:
                return r
        return None

    def by_repo_digest(self, ref: str) -> ImageRecord | None:
        for r in self.by_id.values():
            if ref in r.repo_digests:
                return r
        return None

    def resolve(self, ref: str) -> tuple[ImageRecord | None, str]:
        """Find an image by id, id prefix, tag or digest reference (as containerd CRI).

        Returns the record and how it matched: ``id``, ``tag`` or ``digest``.
        """
        ref = ref.strip()
        if not ref:
            return None, ""
        if is_sha256_digest(ref) or is_hex_id(ref):
            image_id = ref if ref.startswith("sha256:") else "sha256:" + ref
            rec = self.by_id.get(image_id)
            if rec is not None:
                return rec, "id"
        try:
            named = parse_reference(ref)
        except CrivError:
            named = None
        if named is not None:
            if named.digest:
                rec = self.by_repo_digest(named.with_digest(named.digest))
                if rec is not None:
                    return rec, "digest"
            else:
                rec = self.by_tag(str(named))
                if rec is not None:
                    return rec, "tag"
        prefix = ref.removeprefix("sha256:")
        if prefix and all(c in "0123456789abcdef" for c in prefix):
            found = [r for r in self.by_id.values() if digest_hex(r.id).startswith(prefix)]
            if len(found) == 1:
                return found[0], "id"
        return None, ""
