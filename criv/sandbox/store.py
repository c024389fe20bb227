"""Where records live: in memory and on disk, one mutation path, one lock per record.

A record is immutable; a change is ``Store.update(id, fn)`` with ``fn`` returning the new
record, which the store checks with the injected transition checker, writes to disk
(versioned JSON, atomically, via :mod:`criv.state.records`) and only then publishes in
memory. Updates of one record are serialized by that record's lock; records of other
pods never wait for each other. Store locks are leaves of the lock order (see
:mod:`criv.sandbox.locks`): nothing else is awaited while one is held but the write.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from criv.errors import AmbiguousId, NotFound
from criv.sandbox.locks import KeyedLocks
from criv.state.records import read_record, write_record


class _Record(Protocol):
    @property
    def id(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=_Record)


class Store(Generic[R]):
    """Records of one kind; ``update`` is the one mutation path."""

    def __init__(
        self,
        kind: str,
        version: int,
        path_of: Callable[[R], Path],
        loader: Callable[[dict[str, Any], int], R],
        check: Callable[[R, R], None],
        what: str,
    ) -> None:
        self._kind = kind
        self._version = version
        self._path_of = path_of
        self._loader = loader
        self._check = check
        self.what = what  # "pod sandbox", "container": for messages
        self._items: dict[str, R] = {}
        self._locks = KeyedLocks()

    def get(self, rid: str) -> R | None:
        return self._items.get(rid)

    def must(self, rid: str) -> R:
        rec = self._items.get(rid)
        if rec is None:
            raise NotFound(f"{self.what} {rid!r} not found")
        return rec

    def all(self) -> list[R]:
        return list(self._items.values())

    def resolve(self, prefix: str) -> str | None:
        """Full id for an id or a unique id prefix (as crictl accepts); None when nothing
        matches; :class:`AmbiguousId` when several do."""
        if prefix in self._items:
            return prefix
        if not prefix:
            return None
        found = [k for k in self._items if k.startswith(prefix)]
        if len(found) > 1:
            raise AmbiguousId(
                f"{self.what} id prefix {prefix!r} is ambiguous: it matches {len(found)} ids"
            )
        return found[0] if found else None

    def find(self, prefix: str) -> R:
        """The record for an id or unique prefix, or NotFound."""
        full = self.resolve(prefix)
        if full is None:
            raise NotFound(f"{self.what} {prefix!r} not found")
        return self.must(full)

    def load(self, path: Path) -> R:
        version, data = read_record(path, self._kind, self._version)
        rec = self._loader(data, version)
        self._items[rec.id] = rec
        return rec

    async def add(self, rec: R) -> R:
        async with self._locks.hold(rec.id):
            await asyncio.to_thread(self._write, rec)
            self._items[rec.id] = rec
        return rec

    async def update(self, rid: str, fn: Callable[[R], R]) -> R:
        return (await self.update_pair(rid, fn))[1]

    async def update_pair(self, rid: str, fn: Callable[[R], R]) -> tuple[R, R]:
        """Like ``update``, returning (old, new) as seen under the record's lock; a
        ``fn`` that returns its argument writes nothing."""
        async with self._locks.hold(rid):
            old = self._items.get(rid)
            if old is None:
                raise NotFound(f"{self.what} {rid!r} not found")
            new = fn(old)
            if new is old or new == old:
                return old, old
            self._check(old, new)
            await asyncio.to_thread(self._write, new)
            self._items[rid] = new
            return old, new

    async def delete(self, rid: str, remove_dir: Path | None = None) -> None:
        async with self._locks.hold(rid):
            rec = self._items.pop(rid, None)
            if rec is not None:
                await asyncio.to_thread(_unlink, self._path_of(rec))
            if remove_dir is not None:
                await asyncio.to_thread(shutil.rmtree, remove_dir, True)

    def _write(self, rec: R) -> None:
        write_record(self._path_of(rec), self._kind, self._version, rec.to_dict())


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
