"""Pod and container records, and the store each lives in.

A record is immutable (a frozen dataclass); a change is ``Store.update(id, fn)`` with
``fn`` returning the new record, which the store checks against the state machine
(:mod:`criv.sandbox.states`), writes to disk (versioned JSON, atomically, via
:mod:`criv.state.records`) and only then publishes in memory. Updates of one store
are serialized by a lock, so two RPCs never interleave a read-modify-write.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from criv.errors import NotFound
from criv.sandbox.states import ContainerState, PodState, check_container, check_pod
from criv.state.records import read_record, write_record

POD_KIND = "sandbox"
POD_VERSION = 1
CONTAINER_KIND = "container"
CONTAINER_VERSION = 1


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any) -> bytes:
    return base64.b64decode(s) if isinstance(s, str) else b""


@dataclass(frozen=True)
class PortMap:
    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""


@dataclass(frozen=True)
class PodRecord:
    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    state: PodState
    created_at_ns: int
    handler: str
    isolation: str  # "host" | "vm"
    config: bytes  # serialized runtime.v1.PodSandboxConfig, passed to the agent as is
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_directory: str = ""
    host_network: bool = False
    port_mappings: tuple[PortMap, ...] = ()
    netns: str = ""
    # The CNI list as it was at ADD time and its final result: what DEL needs.
    cni_network: dict[str, Any] = field(default_factory=dict)
    cni_result: dict[str, Any] = field(default_factory=dict)
    ips: tuple[str, ...] = ()
    network_ready: bool = False
    # What the isolation mode needs to find its agent again (host: pid, start time).
    isolation_state: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    # pod-level resources (see PodSpec.resources): the VM size of a vm pod
    resources: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        d["config"] = _b64(self.config)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PodRecord:
        d = dict(d)
        d["state"] = PodState(d["state"])
        d["config"] = _unb64(d.get("config"))
        d["port_mappings"] = tuple(PortMap(**p) for p in d.get("port_mappings", ()))
        d["ips"] = tuple(d.get("ips", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class MountRecord:
    container_path: str
    host_path: str
    readonly: bool = False
    selinux_relabel: bool = False
    propagation: int = 0  # runtime.v1.MountPropagation value


@dataclass(frozen=True)
class ContainerRecord:
    id: str
    sandbox_id: str
    name: str
    attempt: int
    state: ContainerState
    created_at_ns: int
    config: bytes  # serialized runtime.v1.ContainerConfig
    image: str  # as the caller named it
    image_id: str
    image_ref: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_path: str = ""  # absolute host path, "" when kubelet gave none
    mounts: tuple[MountRecord, ...] = ()
    rootfs: str = ""
    started_at_ns: int = 0
    finished_at_ns: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0
    resources: bytes = b""  # serialized runtime.v1.LinuxContainerResources
    log_done: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        d["config"] = _b64(self.config)
        d["resources"] = _b64(self.resources)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ContainerRecord:
        d = dict(d)
        d["state"] = ContainerState(d["state"])
        d["config"] = _unb64(d.get("config"))
        d["resources"] = _unb64(d.get("resources"))
        d["mounts"] = tuple(MountRecord(**m) for m in d.get("mounts", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class _Record(Protocol):
    @property
    def id(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=_Record)


class Store(Generic[R]):
    """Records of one kind, in memory and on disk; ``update`` is the one mutation path."""

    def __init__(
        self,
        kind: str,
        version: int,
        path_of: Callable[[R], Path],
        loader: Callable[[dict[str, Any]], R],
    ) -> None:
        self._kind = kind
        self._version = version
        self._path_of: Callable[[R], Path] = path_of
        self._loader: Callable[[dict[str, Any]], R] = loader
        self._items: dict[str, R] = {}
        self._lock = asyncio.Lock()

    def get(self, rid: str) -> R | None:
        return self._items.get(rid)

    def must(self, rid: str, what: str) -> R:
        rec = self._items.get(rid)
        if rec is None:
            raise NotFound(f"{what} {rid!r} not found")
        return rec

    def all(self) -> list[R]:
        return list(self._items.values())

    def resolve(self, prefix: str) -> str | None:
        """Full id for an id or a unique id prefix (as crictl accepts), else None."""
        if prefix in self._items:
            return prefix
        if not prefix:
            return None
        found = [k for k in self._items if k.startswith(prefix)]
        return found[0] if len(found) == 1 else None

    def load(self, path: Path) -> R:
        _, data = read_record(path, self._kind, self._version)
        rec = self._loader(data)
        self._items[rec.id] = rec
        return rec

    async def add(self, rec: R) -> R:
        async with self._lock:
            await asyncio.to_thread(self._write, rec)
            self._items[rec.id] = rec
        return rec

    async def update(self, rid: str, fn: Callable[[R], R]) -> R:
        return (await self.update_pair(rid, fn))[1]

    async def update_pair(self, rid: str, fn: Callable[[R], R]) -> tuple[R, R]:
        """Like ``update``, returning (old, new) as seen under the lock."""
        async with self._lock:
            old = self._items.get(rid)
            if old is None:
                raise NotFound(f"{self._kind} {rid!r} not found")
            new = fn(old)
            if new is old:
                return old, old
            if isinstance(old, PodRecord) and isinstance(new, PodRecord):
                check_pod(old.state, new.state, f"pod {rid[:12]}")
            elif isinstance(old, ContainerRecord) and isinstance(new, ContainerRecord):
                check_container(old.state, new.state, f"container {rid[:12]}")
            await asyncio.to_thread(self._write, new)
            self._items[rid] = new
            return old, new

    async def delete(self, rid: str, remove_dir: Path | None = None) -> None:
        async with self._lock:
            rec = self._items.pop(rid, None)
            if rec is not None:
                path = self._path_of(rec)
                await asyncio.to_thread(_unlink, path)
            if remove_dir is not None:
                await asyncio.to_thread(shutil.rmtree, remove_dir, True)

    def _write(self, rec: R) -> None:
        write_record(self._path_of(rec), self._kind, self._version, rec.to_dict())


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
