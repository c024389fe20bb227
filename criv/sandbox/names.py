"""Name reservation, as containerd does it: a pod or container name (metadata plus
pod identity and attempt) belongs to one id until that id is removed."""

from __future__ import annotations

from criv.errors import AlreadyExists


class NameIndex:
    def __init__(self, what: str) -> None:
        self._what = what
        self._by_name: dict[str, str] = {}

    def reserve(self, name: str, rid: str) -> None:
        holder = self._by_name.get(name)
        if holder is not None and holder != rid:
            raise AlreadyExists(
                f"{self._what} name {name!r} is reserved for {holder}; remove it first"
            )
        self._by_name[name] = rid

    def holder(self, name: str) -> str | None:
        return self._by_name.get(name)

    def release(self, name: str, rid: str) -> None:
        if self._by_name.get(name) == rid:
            del self._by_name[name]
