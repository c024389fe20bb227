"""The libvirt driver: create, stop, find and watch criv's domains. The only libvirt user.

Every libvirt call blocks (it is an RPC to libvirtd), so each runs on a worker thread, never
on the event loop, with a deadline (``vm.libvirt_call_timeout_seconds``) after which its
caller gets UNAVAILABLE (:mod:`criv.hypervisor.calls`): a hung libvirtd cannot hold a pod's
lock for ever. Lifecycle events come from libvirt's default event loop on a
daemon thread and are handed to asyncio with ``call_soon_threadsafe``; a slow poll backs them
up, so a missed event (libvirtd restart) only delays noticing a dead VM.

Domains are transient (``createXML``): a VM that stops is gone from libvirt; criv keeps its
own records and re-adopts running domains by name prefix and metadata after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt
import libvirt_qemu  # type: ignore[import-untyped]

from criv.errors import CrivError, Unavailable
from criv.hypervisor import live
from criv.hypervisor.calls import DeadlineCalls
from criv.hypervisor.domain import DOMAIN_PREFIX, Domain
from criv.hypervisor.domaininfo import (
    DomainInfo,
    DomainStats,
    console_pty,
    domain_info,
    stop_reason,
)
from criv.hypervisor.libvirtbase import DEFAULT_URI, start_libvirt_event_loop, translate

log = logging.getLogger(__name__)

T = TypeVar("T")
# seconds a libvirt call may take before its caller is released; createXML starts QEMU
# (and libvirt's own waits for its monitor), so it gets more
CALL_TIMEOUT = 60.0
CREATE_TIMEOUT_FACTOR = 2


StopCallback = Callable[[str, str], None]


class Hypervisor:
    """One libvirt connection, used from asyncio. ``await connect()`` before anything else."""

    def __init__(
        self, uri: str = DEFAULT_URI, threads: int = 4, call_timeout: float = CALL_TIMEOUT
    ) -> None:
        self.uri = uri
        self.call_timeout = call_timeout
        self._calls = DeadlineCalls(threads, "criv-libvirt")
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._callback_id: int | None = None
        self._stopped: dict[str, asyncio.Event] = {}
        self._listeners: list[StopCallback] = []
        self._resets: set[str] = set()  # domains whose QEMU shut down for a guest reset

    # --- plumbing
    async def _call(
        self, fn: Callable[[libvirt.virConnect], T], what: str, timeout: float | None = None
    ) -> T:
        def run() -> T:
            return fn(self._connection())

        return await self._calls.run(run, what, timeout or self.call_timeout)

    def _connection(self) -> libvirt.virConnect:
        with self._conn_lock:
            if self._conn is not None and self._conn.isAlive():
                return self._conn
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise Unavailable(
                    f"cannot connect to libvirtd at {self.uri} (is it running? "
                    f"`virtlogd -d; libvirtd -d`): {e.get_error_message()}"
                ) from e
            # keepalive: a dead libvirtd is noticed in ~15 s instead of at the next call
            with contextlib.suppress(libvirt.libvirtError):
                conn.setKeepAlive(5, 3)
            conn.registerCloseCallback(self._on_close, None)
            self._callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
            # QEMU's SHUTDOWN event says why (libvirt's STOPPED_SHUTDOWN does not): a guest
            # reset (on_reboot=destroy: a reboot, a triple fault, the firmware giving up)
            with contextlib.suppress(libvirt.libvirtError):
                libvirt_qemu.qemuMonitorEventRegister(
                    conn, None, "SHUTDOWN", self._on_qemu_shutdown, None, 0
                )
            self._conn = conn
            return conn

    def _on_close(self, conn: libvirt.virConnect, reason: int, opaque: Any) -> None:
        log.warning("libvirt connection closed (reason %s); reconnecting on next use", reason)
        with self._conn_lock:
            self._conn = None

    def _on_qemu_shutdown(
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, event: str, *args: Any
    ) -> None:
        name = dom.name()
        if name.startswith(DOMAIN_PREFIX) and any('"guest-reset"' in str(a) for a in args):
            self._resets.add(name)

    def _on_lifecycle(
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, detail: int, _: Any
    ) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
            self._resets.discard(dom.name())
        if event != libvirt.VIR_DOMAIN_EVENT_STOPPED:
            return
        name = dom.name()
        reset = name in self._resets
        self._resets.discard(name)
        if not name.startswith(DOMAIN_PREFIX) or self._loop is None:
            return
        reason = stop_reason(detail, reset)
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(self._stopped_on_loop, name, reason)

    def _stopped_on_loop(self, name: str, reason: str) -> None:
        if ev := self._stopped.get(name):
            ev.set()
        for cb in list(self._listeners):
            try:
                cb(name, reason)
            except Exception:
                log.exception("domain stop listener failed for %s", name)

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        start_libvirt_event_loop()
        await self._call(lambda c: None, f"connecting to {self.uri}")

    async def close(self) -> None:
        def close() -> None:
            with self._conn_lock:
                conn, self._conn = self._conn, None
            if conn is None:
                return
            with contextlib.suppress(libvirt.libvirtError):
                if self._callback_id is not None:
                    conn.domainEventDeregisterAny(self._callback_id)
                conn.unregisterCloseCallback()
                conn.close()

        # bounded: a hung libvirtd must not keep criv from stopping
        with contextlib.suppress(CrivError):
            await self._calls.run(close, "closing the libvirt connection", self.call_timeout)

    def add_stop_listener(self, cb: StopCallback) -> None:
        """``cb(name, reason)`` on the event loop whenever a criv domain stops (any cause)."""
        self._listeners.append(cb)

    # --- operations
    async def probe_capabilities(self, virttype: str = "qemu") -> None:
        """Have libvirtd probe QEMU's capabilities now (or load its cache of them): after
        libvirtd starts, the first domain created pays seconds for it otherwise."""

        def caps(c: libvirt.virConnect) -> None:
            try:
                c.getDomainCapabilities(None, "x86_64", None, virttype, 0)
            except libvirt.libvirtError as e:
                raise translate(e, "probing QEMU's capabilities") from e

        timeout = self.call_timeout * CREATE_TIMEOUT_FACTOR
        await self._call(caps, "probing QEMU's capabilities", timeout)

    async def create(self, domain: Domain, paused: bool = False) -> DomainInfo:
        """Boot a transient domain from ``domain``; returns once QEMU runs (not the guest).
        ``paused``: its vCPUs wait (a clone, until its state is loaded)."""
        xml = domain.to_xml()
        self._stopped[domain.name] = asyncio.Event()
        # VALIDATE: libvirt checks the XML against its schema instead of ignoring typos
        flags = libvirt.VIR_DOMAIN_START_VALIDATE
        if paused:
            flags |= libvirt.VIR_DOMAIN_START_PAUSED

        def create(c: libvirt.virConnect) -> DomainInfo:
            try:
                dom = c.createXML(xml, flags)
            except libvirt.libvirtError as e:
                raise translate(e, f"creating domain {domain.name}") from e
            return domain_info(dom)

        try:
            info = await self._call(
                create, f"creating domain {domain.name}", self.call_timeout * CREATE_TIMEOUT_FACTOR
            )
        except BaseException:
            self._stopped.pop(domain.name, None)
            raise
        log.info("domain %s started (uuid %s)", info.name, info.uuid)
        return info

    async def lookup(self, name: str = "", uuid: str = "") -> DomainInfo | None:
        """The domain by name or UUID, or None when libvirt does not know it."""

        def find(c: libvirt.virConnect) -> DomainInfo | None:
            try:
                dom = c.lookupByName(name) if name else c.lookupByUUIDString(uuid)
                return domain_info(dom)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise translate(e, f"looking up domain {name or uuid}") from e

        return await self._call(find, f"looking up domain {name or uuid}")

    async def stats(self, name: str) -> DomainStats | None:
        """The domain's counters, or None when it is not running."""

        def get(c: libvirt.virConnect) -> DomainStats | None:
            try:
                dom = c.lookupByName(name)
                info = dom.info()  # [state, max KiB, KiB, vcpus, cpu time ns]
                mem = dom.memoryStats()
            except libvirt.libvirtError as e:
                if e.get_error_code() in (
                    libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_OPERATION_INVALID,
                ):
                    return None
                raise translate(e, f"domain {name} stats") from e
            kib = int(mem.get("rss") or info[2])
            return DomainStats(cpu_ns=int(info[4]), memory_bytes=kib * 1024)

        return await self._call(get, f"domain {name} stats")

    async def list_domains(self) -> list[DomainInfo]:
        """criv's domains (name prefix ``criv-``), sorted by name."""

        def ls(c: libvirt.virConnect) -> list[DomainInfo]:
            out = []
            try:
                doms = c.listAllDomains(0)
            except libvirt.libvirtError as e:
                raise translate(e, "listing domains") from e
            for dom in doms:
                try:
                    if dom.name().startswith(DOMAIN_PREFIX):
                        out.append(domain_info(dom))
                except libvirt.libvirtError:
                    continue  # vanished while we looked
            return sorted(out, key=lambda d: d.name)

        return await self._call(ls, "listing domains")

    async def state(self, name: str) -> str:
        """The domain's state word; ``"gone"`` once a transient domain has stopped."""
        info = await self.lookup(name)
        return info.state if info else "gone"

    async def destroy(self, name: str) -> bool:
        """Kill the VM now. Idempotent: False when there was nothing to destroy."""

        def destroy(c: libvirt.virConnect) -> bool:
            try:
                c.lookupByName(name).destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
                return True
            except libvirt.libvirtError as e:
                code = e.get_error_code()
                if code in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                    return False
                # GRACEFUL gives QEMU a few seconds after SIGTERM; insist with SIGKILL
                try:
                    c.lookupByName(name).destroy()
                    return True
                except libvirt.libvirtError as e2:
                    if e2.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        return False
                    raise translate(e2, f"destroying domain {name}") from e2

        done = await self._call(destroy, f"destroying domain {name}")
        if done:
            log.info("domain %s destroyed", name)
        self._stopped.pop(name, None)
        return done

    async def destroy_quietly(self, name: str, timeout: float = 10.0) -> None:
        """Destroy the VM and wait up to ``timeout`` s for it to stop, libvirt's errors
        ignored: an undo path's cleanup, which must not hide the error that caused it."""
        with contextlib.suppress(CrivError):
            await self.destroy(name)
            await self.wait_stopped(name, timeout)

    async def shutdown(self, name: str, timeout: float) -> str:
        """Ask the guest to power off (ACPI), wait up to ``timeout`` s, then destroy.

        Returns "gone" (was not running), "shutdown" or "destroyed". The guest init powers off
        when the agent exits, so the sandbox layer usually asks the agent first and calls this
        with a short deadline.
        """

        def ask(c: libvirt.virConnect) -> bool:
            try:
                c.lookupByName(name).shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                return True
            except libvirt.libvirtError as e:
                if e.get_error_code() in (
                    libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_OPERATION_INVALID,
                ):
                    return False
                raise translate(e, f"shutting down domain {name}") from e

        if not await self._call(ask, f"shutting down domain {name}"):
            return "gone"
        if await self.wait_stopped(name, timeout):
            return "shutdown"
        await self.destroy(name)
        return "destroyed"

    async def vcpus(self, name: str) -> tuple[int, int]:
        """(live vCPUs, most vCPUs) of a running domain."""
        return await self._call(lambda c: _live(live.vcpus, c, name), f"vCPUs of {name}")

    async def set_vcpus(self, name: str, count: int) -> int:
        """Hot-plug or unplug vCPUs of a running domain to ``count`` (:mod:`.live`)."""
        what = f"setting domain {name} to {count} vCPUs"
        return await self._call(lambda c: _live(live.set_vcpus, c, name, count), what)

    async def console_pty(self, name: str) -> str:
        """The host pty of a running domain's serial console."""
        return await self._call(lambda c: _live(console_pty, c, name), f"console of {name}")

    async def memory(self, name: str) -> int:
        """MiB the guest of a running domain has now, behind its balloon (:mod:`.live`)."""
        return await self._call(lambda c: _live(live.memory, c, name), f"memory of {name}")

    async def memory_use(self, name: str) -> tuple[int, int]:
        """(MiB the guest has, MiB in use) of a running domain, asked of the guest's balloon
        driver ((0, 0): it did not say; :func:`.live.guest_memory_use`)."""
        return await self._call(
            lambda c: _live(live.guest_memory_use, c, name), f"memory use of {name}"
        )

    async def set_memory(self, name: str, mib: int) -> None:
        """Set the balloon target of a running domain to ``mib`` MiB (:mod:`.live`)."""
        what = f"setting domain {name} to {mib} MiB"
        await self._call(lambda c: _live(live.set_memory, c, name, mib), what)

    async def on_live(
        self,
        fn: Callable[..., T],
        name: str,
        *args: Any,
        what: str,
        timeout: float | None = None,
    ) -> T:
        """``fn(connection, name, *args)``, a blocking call on a running domain (as in
        :mod:`.snapshot`), on a worker thread with a deadline, libvirt's errors translated."""
        return await self._call(lambda c: _live(fn, c, name, *args), what, timeout)

    async def wait_stopped(
        self, name: str, timeout: float | None = None, poll: float = 0.5
    ) -> bool:
        """Wait until the domain is gone; True if it stopped within ``timeout``."""
        ev = self._stopped.setdefault(name, asyncio.Event())
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = await self.lookup(name)
            if info is None or not info.alive:
                self._stopped.pop(name, None)
                return True
            wait = poll if deadline is None else min(poll, deadline - time.monotonic())
            if wait <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), wait)


def _live(fn: Callable[..., T], c: libvirt.virConnect, name: str, *args: Any) -> T:
    try:
        return fn(c, name, *args)
    except libvirt.libvirtError as e:
        raise translate(e, f"domain {name}") from e
