"""VM templates: one booted VM per guest image + VM shape, saved, then cloned by every pod.

A template is a VM of the pod's shape (kernel, initramfs, vCPUs, memory, machine, accel)
with no device of its own (no share, NIC or vsock: QEMU 7.2 cannot migrate vhost-user
devices): it boots, its agent starts and listens, and criv saves its state (device state
and the non-zero pages of its guest RAM, :mod:`criv.hypervisor.snapshot`) into
``<template dir>/<key>/``. A clone
(:mod:`.clone`) loads that state instead of booting, and gets the pod's devices hot-plugged.

The key hashes the template's whole domain XML (so any change of image, shape, device
layout or command line is a new key), QEMU's binary and criv's version; a template whose
state a clone cannot load is dropped (:meth:`Templates.drop`) and built again.

Building::

    (none) --ensure()--> BUILDING --saved--> READY
                            \\--failed--> FAILED (not retried for RETRY_AFTER s)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import criv
from criv.atomicfile import write_atomic
from criv.config import Config
from criv.errors import CrivError, FailedPrecondition
from criv.hypervisor import snapshot
from criv.hypervisor.driver import Hypervisor
from criv.hypervisor.spec import TEMPLATE_DOMAIN_PREFIX, PodVm, pod_domain, template_shape
from criv.sandbox.vm.console import console_tail
from criv.sandbox.vm.host import VmHost

log = logging.getLogger("criv.sandbox.vm")

FORMAT = 2  # 2: device state and a sparse RAM file (1: RAM inside the stream)
QEMU_BINARY = Path("/usr/bin/qemu-system-x86_64")
# the agent's log line once it listens (the guest's console is the template's log)
READY_MARKER = "criv-agent serving"
BUILD_TIMEOUT = 240.0
SAVE_TIMEOUT = 60.0
# after the agent listens: the guest's free page reporting returns what boot freed (its
# delay is 2 s), so the saved RAM, and every clone's, is smaller
SETTLE_SECONDS = 2.5
RETRY_AFTER = 600.0
# a template no pod was cloned from for this long is removed (a new criv, guest image or
# shape makes a new key; the old ones would pile up in vm.template_dir)
MAX_UNUSED = 24 * 3600.0
# a build directory this old is a killed criv's leftover
STALE_BUILD = 3600.0
CONSOLE_SCAN_BYTES = 64 * 1024


class BuildState(enum.Enum):
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class Template:
    key: str
    dir: Path

    @property
    def state(self) -> Path:
        return self.dir / "state.bin"

    @property
    def ram(self) -> Path:
        return self.dir / "ram.bin"


def template_root(config: Config) -> Path:
    """Where templates are kept: ``vm.template_dir``, else ``<run_dir>/templates``."""
    return Path(config.vm.template_dir or Path(config.run_dir) / "templates")


def listing(root: Path) -> list[tuple[str, int, float]]:
    """(key, bytes of RAM data, created) of the ready templates under ``root``."""
    out = []
    for meta in sorted(root.glob("[!.]*/meta.json")):
        with contextlib.suppress(OSError, ValueError):
            m = json.loads(meta.read_text())
            if m.get("format") == FORMAT:
                ram = meta.parent / "ram.bin"
                out.append((meta.parent.name, ram.stat().st_blocks * 512, float(m["created"])))
    return out


def _qemu_identity() -> str:
    try:
        st = QEMU_BINARY.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "?"


def template_key(vm: PodVm) -> str:
    """The template of ``vm``'s shape: a hash of all that makes its saved state loadable."""
    domain = pod_domain(replace(template_shape(vm), name=TEMPLATE_DOMAIN_PREFIX + "key"))
    h = hashlib.sha256()
    for part in (str(FORMAT), criv.__version__, _qemu_identity(), domain.to_xml()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:32]


class Templates:
    """The template directory and the background builds into it (one per key at a time)."""

    def __init__(self, root: Path, host: VmHost, owner: str) -> None:
        self._root = root
        self._host = host
        self._owner = owner
        self._builds: dict[str, asyncio.Task[None]] = {}
        self._states: dict[str, tuple[BuildState, float]] = {}

    def find(self, key: str) -> Template | None:
        """The ready template of ``key``, if there is one."""
        t = Template(key, self._root / key)
        try:
            meta = json.loads((t.dir / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("format") != FORMAT or not (t.state.is_file() and t.ram.is_file()):
            return None
        with contextlib.suppress(OSError):
            os.utime(t.dir / "meta.json")  # its last use: see prune()
        return t

    def prune(self) -> list[str]:
        """Remove what no pod will clone again (blocking): :func:`prune`, sparing the
        templates being built."""
        gone = prune(self._root, set(self._builds), time.time())
        for name in gone:
            log.info("template %s removed: unused, or its guest image is gone", name[:16])
        return gone

    def state(self, key: str) -> str:
        """``ready``, ``building``, ``failed`` or ``none`` (for status and doctor)."""
        if self.find(key) is not None:
            return BuildState.READY.value
        st = self._states.get(key)
        return st[0].value if st else "none"

    def drop(self, key: str) -> None:
        """Forget a template whose state did not load (it is built again later)."""
        log.warning("template %s dropped: a clone could not load it", key[:12])
        shutil.rmtree(self._root / key, ignore_errors=True)
        self._states.pop(key, None)

    def ensure(self, key: str, vm: PodVm) -> None:
        """Build the template of ``key`` in the background unless it exists, is being
        built, or failed lately."""
        if self.find(key) is not None or key in self._builds:
            return
        st = self._states.get(key)
        if st and st[0] is BuildState.FAILED and time.monotonic() - st[1] < RETRY_AFTER:
            return
        self._states[key] = (BuildState.BUILDING, time.monotonic())
        task = asyncio.ensure_future(self._build(key, vm))
        self._builds[key] = task
        task.add_done_callback(lambda _: self._builds.pop(key, None))

    async def close(self) -> None:
        """Stop the builds in progress (their VMs are destroyed)."""
        for task in list(self._builds.values()):
            task.cancel()
        for task in list(self._builds.values()):
            with contextlib.suppress(BaseException):
                await task

    async def _build(self, key: str, vm: PodVm) -> None:
        name = TEMPLATE_DOMAIN_PREFIX + key[:16]
        work = self._root / f".{key}.building"
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(_fresh_dir, work)
            console = work / "console.log"
            spec = replace(template_shape(vm), name=name, console_log=console, owner=self._owner)
            hv = await self._host.hypervisor()
            domain = pod_domain(spec)
            await hv.create(domain)
            try:
                await asyncio.wait_for(_agent_listening(console, hv, name), BUILD_TIMEOUT)
                await asyncio.sleep(SETTLE_SECONDS)
                saved = Template(key, work)
                size = await snapshot.save(
                    hv, name, saved.state, saved.ram, domain.memory_mib << 20, SAVE_TIMEOUT
                )
            finally:
                with contextlib.suppress(CrivError):
                    await asyncio.shield(hv.destroy(name))
            meta = {
                "format": FORMAT, "key": key, "created": time.time(), "bytes": size,
                "kernel": str(vm.kernel), "initrd": str(vm.initrd),
                "root_disk": str(vm.root_disk or ""),
            }  # fmt: skip
            await asyncio.to_thread(_publish, work, self._root / key, meta)
            await asyncio.to_thread(self.prune)
            self._states[key] = (BuildState.READY, time.monotonic())
            log.info(
                "template %s ready in %.1fs (%d MiB of guest RAM)",
                key[:12], time.monotonic() - t0, size >> 20,
            )  # fmt: skip
        except asyncio.CancelledError:
            shutil.rmtree(work, ignore_errors=True)
            self._states.pop(key, None)
            raise
        except (CrivError, OSError, TimeoutError) as e:
            tail = await asyncio.to_thread(console_tail, work / "console.log")
            log.warning("template %s failed: %s; pods boot cold\n%s", key[:12], e, tail)
            shutil.rmtree(work, ignore_errors=True)
            self._states[key] = (BuildState.FAILED, time.monotonic())


def prune(root: Path, building: set[str], now: float, max_unused: float = MAX_UNUSED) -> list[str]:
    """Remove from ``root`` the templates no pod will clone again: one whose guest image
    (kernel or initramfs, as its meta.json records) is gone, or that no pod was cloned
    from for ``max_unused`` seconds (meta.json's mtime, refreshed by each clone); and
    build directories older than :data:`STALE_BUILD` not in ``building`` (a killed
    criv's). Templates of another format stay until unused that long: a newer criv may
    share the directory. The names removed."""
    gone = []
    with contextlib.suppress(FileNotFoundError):
        for d in sorted(root.iterdir()):
            if not d.is_dir() or d.is_symlink():
                continue
            if d.name.startswith("."):
                key = d.name[1:].removesuffix(".building")
                if key not in building and now - d.stat().st_mtime > STALE_BUILD:
                    shutil.rmtree(d, ignore_errors=True)
                    gone.append(d.name)
                continue
            if d.name in building:
                continue
            if _unusable(d, now, max_unused):
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d.name)
    return gone


def _unusable(d: Path, now: float, max_unused: float) -> bool:
    meta_file = d / "meta.json"
    try:
        used = meta_file.stat().st_mtime
    except OSError:
        used = d.stat().st_mtime  # no meta: judged by the directory's age
    if now - used > max_unused:
        return True
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return False
    for k in ("kernel", "initrd", "root_disk"):
        path = meta.get(k) if isinstance(meta, dict) else None
        if isinstance(path, str) and path.startswith("/") and not Path(path).exists():
            return True
    return False


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.mkdir(mode=0o700)


def _publish(work: Path, final: Path, meta: dict[str, object]) -> None:
    write_atomic(work / "meta.json", json.dumps(meta).encode())
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)


async def _agent_listening(console: Path, hv: Hypervisor, name: str) -> None:
    polls = 0
    while True:
        data = await asyncio.to_thread(console_tail, console, CONSOLE_SCAN_BYTES)
        if READY_MARKER in data:
            return
        polls += 1
        if polls % 10 == 0 and await hv.state(name) == "gone":
            raise FailedPrecondition(f"template VM {name} stopped before its agent listened")
        await asyncio.sleep(0.1)
