"""Spare VMs: clones of a template, started and loaded ahead of the pod that takes one.

Most of a clone's own start needs nothing of its pod: libvirt starting QEMU and loading
the template's RAM and device state (~0.85 s of ~2.6 s under TCG, measured by
bench/podstart.py). Only the devices hot-plugged after it are the pod's. So criv keeps
``vm.spare_vms`` such clones of the shape of the last templated pod, loaded and running
idle, and a pod takes one: it plugs its devices in (:mod:`.clone`). A spare runs so that
its agent can warm its code paths before its pod comes (under TCG a clone starts with no
translated code: the guest agent's warmup.py), which halves what the agent's first answer
and SetupSandbox take. What makes the guest the pod's own (clock, RNG reseed, machine-id,
hostname, MAC, IP) happens at SetupSandbox, as for any clone; a spare serves one pod and
is never handed back.

libvirt cannot rename a running domain, so a spare keeps its name (``criv-spare-<hex>``)
and its console log (``<run_dir>/spares/<name>/console.log``); the pod's record names
both (``VmState.domain``, ``VmState.console_log``), and the spare's directory goes with
the pod. Spares are criv's alone: they are destroyed when criv stops, and a spare left by
a criv that was killed is an orphan domain to the start-up sweep.

One spare::

    (refill) --created, loaded, run--> RUNNING (idle) --take()--> the pod's VM
                  \\--failed--> destroyed   \\--drop(), another shape, close()--> destroyed

A refill starts once no pod has started for ``quiet`` seconds: on a 2-core host a refill
beside a starting pod slows that pod down more than the spare saves the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from criv.errors import CrivError
from criv.hypervisor import snapshot
from criv.hypervisor.domain import DOMAIN_PREFIX, Domain
from criv.hypervisor.domaininfo import DomainInfo
from criv.hypervisor.driver import Hypervisor
from criv.hypervisor.spec import PodVm, domain_name, pod_domain, template_shape
from criv.sandbox.isostate import VmState
from criv.sandbox.vm.host import VmHost
from criv.sandbox.vm.template import Template, Templates

log = logging.getLogger("criv.sandbox.vm")

SPARE_DOMAIN_PREFIX = DOMAIN_PREFIX + "spare-"
_SPARE_NAME = re.compile(re.escape(SPARE_DOMAIN_PREFIX) + r"[0-9a-f]{16}")
LOAD_TIMEOUT = 60.0
# no pod started this long: a refill may run
REFILL_QUIET = 3.0
BUILD_POLL = 1.0
# a spare that does not come up in this long is given up (its domain destroyed)
MAKE_TIMEOUT = 120.0


def is_spare_name(name: str) -> bool:
    """True for a name criv gives its spares (and nothing else)."""
    return _SPARE_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class Spare:
    """A loaded clone of the template ``key``, running idle."""

    key: str
    info: DomainInfo
    domain: Domain
    console_log: Path

    @property
    def name(self) -> str:
        return self.info.name


def vm_domain(sandbox_id: str, state: VmState | None) -> str:
    """A vm pod's domain: the spare its record names, else the sandbox's own name."""
    if state is not None and is_spare_name(state.domain):
        return state.domain
    return domain_name(sandbox_id)


def spare_dir(root: Path, name: str) -> Path:
    """A spare's directory (its console log) under ``root``; ``name`` must be a spare's."""
    if not is_spare_name(name):
        raise ValueError(f"not a spare's name: {name!r}")
    return root / name


def spare_console(root: Path, name: str) -> Path:
    """The console log of the spare ``name`` (a pod's VM once taken)."""
    return spare_dir(root, name) / "console.log"


class SpareVms:
    """The spares of one template shape (the last one a pod was cloned from)."""

    def __init__(
        self,
        root: Path,
        host: VmHost,
        templates: Templates,
        count: int,
        owner: str,
        quiet: float = REFILL_QUIET,
    ) -> None:
        self._root = root
        self._host = host
        self._templates = templates
        self._count = count
        self._owner = owner
        self._quiet = quiet
        self._key = ""
        self._shape: PodVm | None = None
        self._ready: list[Spare] = []
        self._refill: asyncio.Task[None] | None = None
        self._last_start = 0.0
        self._closed = False
        self._discards: set[asyncio.Task[None]] = set()

    @property
    def root(self) -> Path:
        return self._root

    def names(self) -> set[str]:
        """The domains of the spares criv holds now."""
        return {s.name for s in self._ready}

    def note_start(self) -> None:
        """A pod is starting: refills wait until starts have been quiet a while."""
        self._last_start = time.monotonic()

    async def take(self, key: str) -> Spare | None:
        """A running spare of template ``key`` for a pod, or None."""
        self.note_start()
        while self._ready and self._key == key:
            spare = self._ready.pop(0)
            hv = await self._host.hypervisor()
            try:
                state = await hv.state(spare.name)
            except CrivError as e:
                state = f"unknown ({e})"
            if state == "running":
                self._kick()  # its successor, once starts are quiet
                return spare
            log.warning("spare %s is %s, not running: destroyed", spare.name, state)
            await self._discard(spare)
        return None

    def want(self, key: str, vm: PodVm) -> None:
        """Keep spares of template ``key`` (the shape of ``vm``) from now on, refilled in
        the background; spares of another shape are destroyed."""
        if self._count <= 0 or self._closed:
            return
        self.note_start()
        if key != self._key:
            self._discard_later(self._ready)
            self._ready = []
            self._key = key
        self._shape = replace(template_shape(vm), owner=self._owner, incoming=True)
        self._kick()

    def _kick(self) -> None:
        if not self._closed and (self._refill is None or self._refill.done()):
            self._refill = asyncio.ensure_future(self._fill())

    def drop(self, key: str) -> None:
        """The template ``key`` is gone: so are its spares."""
        if key == self._key:
            self._discard_later(self._ready)
            self._ready, self._key = [], ""

    def _discard_later(self, spares: list[Spare]) -> None:
        for spare in spares:
            task = asyncio.ensure_future(self._discard(spare))
            self._discards.add(task)
            task.add_done_callback(self._discards.discard)

    async def release(self, name: str) -> None:
        """A pod's VM that was a spare is gone: its directory goes too."""
        if is_spare_name(name):
            await asyncio.to_thread(shutil.rmtree, spare_dir(self._root, name), True)

    async def close(self) -> None:
        """Stop refilling; destroy every spare (they are no pod's)."""
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(BaseException):
                await self._refill
        old, self._ready = self._ready, []
        for spare in old:
            await self._discard(spare)
        for task in list(self._discards):
            with contextlib.suppress(BaseException):
                await task

    async def sweep(self, keep: set[str]) -> list[str]:
        """At start-up: remove the directories of spares no pod holds (their domains are
        orphans to the domain sweep); the names removed."""

        def sweep() -> list[str]:
            gone = []
            with contextlib.suppress(FileNotFoundError):
                for d in self._root.iterdir():
                    if d.name not in keep and d.name not in self.names():
                        shutil.rmtree(d, ignore_errors=True)
                        gone.append(d.name)
            return gone

        return await asyncio.to_thread(sweep)

    # -- refills -------------------------------------------------------------------

    async def _fill(self) -> None:
        while not self._closed and len(self._ready) < self._count:
            wait = self._last_start + self._quiet - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            key, shape = self._key, self._shape
            template = await asyncio.to_thread(self._templates.find, key) if key else None
            if template is None and key and self._templates.state(key) == "building":
                await asyncio.sleep(BUILD_POLL)  # the first pod of a shape has it built
                continue
            if template is None or shape is None:
                return
            try:
                spare = await asyncio.wait_for(self._make(key, shape, template), MAKE_TIMEOUT)
            except Exception as e:  # a spare is an optimisation: never let it take criv down
                log.warning(
                    "spare VM of template %s failed: %s: %s; pods start as clones",
                    key[:12], type(e).__name__, e,
                )  # fmt: skip
                return
            if key != self._key or self._closed:
                await self._discard(spare)
                return
            self._ready.append(spare)

    async def _make(self, key: str, shape: PodVm, template: Template) -> Spare:
        name = SPARE_DOMAIN_PREFIX + secrets.token_hex(8)
        d = spare_dir(self._root, name)
        await asyncio.to_thread(_fresh_dir, d)
        console = spare_console(self._root, name)
        domain = pod_domain(replace(shape, name=name, console_log=console))
        hv = await self._host.hypervisor()
        t0 = time.monotonic()
        creating = asyncio.ensure_future(hv.create(domain, paused=True))
        try:
            info = await asyncio.shield(creating)
            await snapshot.load(
                hv, name, template.state, template.ram, domain.memory_mib << 20,
                LOAD_TIMEOUT,
            )  # fmt: skip
        except BaseException:
            # cancelled (criv stopping): the create goes on in libvirt's thread; wait for
            # it, so that the destroy finds what it made
            with contextlib.suppress(BaseException):
                await creating
            await asyncio.shield(_destroy(hv, self._host, name))
            await asyncio.to_thread(shutil.rmtree, d, True)
            raise
        log.info("spare %s of template %s ready in %.2fs", name, key[:12], time.monotonic() - t0)
        return Spare(key, info, domain, console)

    async def _discard(self, spare: Spare) -> None:
        with contextlib.suppress(CrivError):
            hv = await self._host.hypervisor()
            await _destroy(hv, self._host, spare.name)
        await self.release(spare.name)


async def _destroy(hv: Hypervisor, host: VmHost, name: str) -> None:
    await hv.destroy_quietly(name)
    await host.settle_stop(name, 1.0)


def _fresh_dir(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
