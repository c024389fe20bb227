"""Plain records for the backend process: what ``dataclasses`` gave, without importing it.

The backend (``python -m criv.vsock``) runs once per VM, and ``dataclasses`` brings
``inspect``, ``ast`` and ``typing`` into every one of them (~1 MiB each). A record names
its fields in ``__slots__``; equality and repr follow from them. A :class:`Record` is
mutable and unhashable (a dataclass with ``eq``); a :class:`FrozenRecord` takes each field
once, in ``__init__``, and hashes (a ``frozen`` dataclass).
"""

from __future__ import annotations


class Record:
    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record) or type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class FrozenRecord(Record):
    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, name):  # an unset slot has no value yet: __init__ sets it
            raise AttributeError(f"{type(self).__name__} is frozen: cannot set {name}")
        object.__setattr__(self, name, value)

    def __hash__(self) -> int:  # type: ignore[override]  # Record's is None: unhashable
        return hash(self._values())
