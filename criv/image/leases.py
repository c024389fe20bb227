"""Leases: image content a holder (a container) uses, kept from GC after its image goes.

``crictl rmi`` may remove an image whose layers are the lowerdirs of a running
container's overlay rootfs. As containerd does with its snapshot references, removing
the image removes only its record (and names); the layer directories a lease names stay
until the last lease on them is released, then GC collects them.

One file per holder, ``<state_dir>/images/leases/<holder>.json``, versioned JSON written
atomically like the image records, so a criv restart keeps what running containers use.
A lease names its layers itself: the image record it came from may be gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from criv.atomicfile import unlink_durable, write_atomic
from criv.errors import ImageError, InvalidArgument
from criv.image.content import private_dir

log = logging.getLogger(__name__)

LEASE_VERSION = 1

# Holder ids become file names: no separators, no dot files (temp files start with ".").
_HOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_holder(holder: str) -> str:
    if not _HOLDER.fullmatch(holder):
        raise InvalidArgument(f"bad lease holder id {holder!r}")
    return holder


@dataclass(frozen=True)
class Lease:
    holder: str
    image_id: str
    # Diff ids, lowest first. Only layer dirs: a running container needs no blob (its
    # config was read at create time), and the compressed blobs would only double the
    # space a removed image keeps.
    layers: tuple[str, ...]
    created_at_ns: int = 0
    version: int = LEASE_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Lease:
        d: dict[str, Any] = json.loads(data)
        if d.get("version") != LEASE_VERSION:
            raise ImageError(f"unsupported image lease version {d.get('version')!r}")
        layers = d.get("layers")
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise ImageError("image lease: layers is not a list of diff ids")
        d["layers"] = tuple(layers)
        return cls(**d)


class LeaseStore:
    """Container leases: the lease files (the truth) and their copy in memory.

    A change writes the file first (in a worker thread) and only then publishes it in
    memory, on the event loop: a failed write leaves memory as it was, like the disk.
    The caller serialises changes (the image store lock).
    """

    def __init__(self, root: Path) -> None:
        self.dir = root / "leases"
        self.by_holder: dict[str, Lease] = {}  # readable leases, as on disk
        # holders whose file cannot be read (say, from a newer criv): keep every layer
        self.unreadable: set[str] = set()

    def setup(self) -> None:
        """Create the dir and load the leases (blocking: at start, before any change)."""
        private_dir(self.dir)
        self.by_holder, self.unreadable = self.load_all()

    def path(self, holder: str) -> Path:
        return self.dir / f"{check_holder(holder)}.json"

    def holders(self) -> set[str]:
        """Every holder with a lease file, readable or not."""
        return set(self.by_holder) | self.unreadable

    def layers(self) -> set[str]:
        """Diff ids the readable leases hold."""
        return {d for lease in self.by_holder.values() for d in lease.layers}

    def load_all(self) -> tuple[dict[str, Lease], set[str]]:
        """(readable leases by holder, holders whose lease file cannot be read).

        An unreadable lease (say, written by a newer criv) is kept on disk and reported:
        nobody can tell which layers it holds, so the caller must not collect layers
        while it exists.
        """
        leases: dict[str, Lease] = {}
        unknown: set[str] = set()
        for p in sorted(self.dir.iterdir()):
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)  # an interrupted atomic write
                continue
            if not p.name.endswith(".json"):
                continue
            holder = p.name.removesuffix(".json")
            try:
                lease = Lease.from_json(p.read_bytes())
                if lease.holder != holder:
                    raise ImageError(f"holder {lease.holder!r} in a file named for {holder!r}")
                leases[holder] = lease
            except (OSError, ValueError, KeyError, TypeError, ImageError) as e:
                log.error("image lease %s unreadable, its layers kept: %s", p, e)
                unknown.add(holder)
        return leases, unknown

    async def put(self, lease: Lease) -> Lease | None:
        """Write ``lease`` (replacing its holder's), then publish it; returns the old one."""
        await asyncio.to_thread(write_atomic, self.path(lease.holder), lease.to_json())
        old = self.by_holder.get(lease.holder)
        self.by_holder[lease.holder] = lease
        self.unreadable.discard(lease.holder)
        return old

    async def drop(self, holder: str) -> Lease | None:
        """Delete ``holder``'s lease file, then forget it; returns the lease it held."""
        await asyncio.to_thread(unlink_durable, self.path(holder))
        self.unreadable.discard(holder)
        return self.by_holder.pop(holder, None)
