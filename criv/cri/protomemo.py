"""Each record's list item, built once per version of the record.

kubelet lists pods and containers every second (PLEG's relist), and building one
``PodSandbox`` or ``Container`` message in Python costs ~4 us: with 50 pods that was a
third of a ``ListPodSandbox``. Records are immutable (a change makes a new object, see
:mod:`criv.sandbox.records`), so the object itself says whether its message is current.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import Message


class _Record(Protocol):
    @property
    def id(self) -> str: ...


R = TypeVar("R", bound=_Record)
M = TypeVar("M", bound=Message)


class ProtoMemo(Generic[R, M]):
    """``convert(record)``, remembered while the record is the same object.

    The messages it returns are shared: copy them into a response (``items=[...]`` and
    ``extend`` copy), never change them. An entry goes when its record object does
    (replaced or deleted in the store), so the memo never outgrows the records alive.
    """

    def __init__(self, convert: Callable[[R], M]) -> None:
        self._convert = convert
        self._items: dict[str, tuple[weakref.ref[R], M]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def items(self, records: list[R]) -> list[M]:
        out: list[M] = []
        for r in records:
            hit = self._items.get(r.id)
            if hit is None or hit[0]() is not r:
                hit = (weakref.ref(r, self._dropper(r.id)), self._convert(r))
                self._items[r.id] = hit
            out.append(hit[1])
        return out

    def _dropper(self, rid: str) -> Callable[[weakref.ref[R]], None]:
        def drop(ref: weakref.ref[R]) -> None:
            hit = self._items.get(rid)
            if hit is not None and hit[0] is ref:
                del self._items[rid]

        return drop
