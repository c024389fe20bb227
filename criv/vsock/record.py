"""Plain records for the backend process: what ``dataclasses`` gave, without importing it.

The backend (``python -m criv.vsock``) runs once per VM, and ``dataclasses`` brings
``inspect``, ``ast`` and ``typing`` into every one of them (~1 MiB each). A record names
its fields in ``__slots__``; equality and repr follow from them. Records are not hashable
(as a dataclass with ``eq`` and without ``frozen``).
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
