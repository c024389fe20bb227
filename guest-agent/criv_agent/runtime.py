"""The agent's container runtime: lifecycle through crun, logs, exec and stats, over its
collaborators: the pod (:mod:`.podsandbox`), exits (:mod:`.exitwatch`: a container whose
exit status was lost to an agent restart is recorded as 255 with a message) and events
(:mod:`.events`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from criv_agent import cgroups
from criv_agent.attach import ContainerIO
from criv_agent.create import Created, crun_create, mount_sources, resources_json, write_bundle
from criv_agent.crun import Crun
from criv_agent.errors import AlreadyExists, FailedPrecondition, InvalidArgument, RuntimeFailure
from criv_agent.events import Event, EventHub
from criv_agent.execstream import ExecRegistry
from criv_agent.execsync import ExecResult, exec_sync
from criv_agent.exitwatch import ExitWatcher
from criv_agent.hostinfo import host_info
from criv_agent.oomwatch import OomWatch
from criv_agent.podsandbox import PodSandbox
from criv_agent.reaper import Reaper
from criv_agent.sandbox import Sandbox
from criv_agent.spec import image_config
from criv_agent.state import ContainerRecord, ContainerStore, State
from criv_agent.stdio import LogSink, Pump

if TYPE_CHECKING:
    from criv_agent.api.agent.v1 import agent_pb2
    from criv_agent.api.runtime.v1 import api_pb2

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_EXIT_LOST = 255


class Runtime:
    def __init__(self, state_dir: str, crun_binary: str) -> None:
        self.state_dir = state_dir
        self.crun = Crun(crun_binary, os.path.join(state_dir, "crun"))
        self.store = ContainerStore(os.path.join(state_dir, "containers"))
        self.host = host_info()
        self.pod = PodSandbox(state_dir)
        self.sinks: dict[str, LogSink] = {}
        self._pumps: dict[str, Pump] = {}
        # live stdio for attach; absent after an agent restart (the pipes died with it)
        self.ios: dict[str, ContainerIO] = {}
        self._exited: dict[str, asyncio.Event] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.exits = ExitWatcher(self._on_exit)
        self.hub = EventHub()
        self.shutdown_requested = asyncio.Event()
        # inits made by crun create whose record is still being written: not orphans
        self._creating: set[int] = set()
        self.reaper = Reaper(self._container_pids)
        self._ooms_seen: dict[str, int] = {}
        self.ooms = OomWatch(self.check_oom)  # memory.events changes (oomwatch.py)
        self.oom_poll_wanted = asyncio.Event()  # a container started that no watch covers
        self.execs = ExecRegistry(self.crun)

    # --- startup -----------------------------------------------------------------------

    async def load(self) -> None:
        """Reload records after an agent restart and re-watch what still runs."""
        self.pod.load()
        for cid in self.store.load():
            log.warning("ignoring unreadable container record %s", cid)
        for rec in self.store.all():
            self.sinks[rec.id] = LogSink(rec.log_path)  # complete: no writer any more
            self._exited[rec.id] = asyncio.Event()
            if rec.state == State.EXITED:
                self._exited[rec.id].set()
                continue
            st = await self.crun.state(rec.id)
            alive = st is not None and st.get("status") in ("created", "running")
            if alive and st is not None and int(st.get("pid", 0)) == rec.pid:
                self.exits.watch(rec.id, rec.pid)
                if rec.state == State.RUNNING:
                    self._watch_ooms(rec)
                continue
            await self._mark_exited(rec.id, None, "exit status lost: the agent restarted")
        # crun containers without a record: the agent died between crun create and
        # writing the record; nobody knows them, so they go
        known = {r.id for r in self.store.all()}
        for cid in await self.crun.list_ids():
            if cid not in known:
                log.warning("deleting crun container %s that has no record", cid)
                await self.crun.delete(cid)

    # --- helpers -----------------------------------------------------------------------

    def _container_pids(self) -> set[int]:
        return {r.pid for r in self.store.all() if r.state != State.EXITED} | self._creating

    def check_oom(self, cid: str) -> None:
        """An OOM kill inside a still-running container (a child killed, init alive)
        becomes an OOM event as it happens; one at exit is reported by _mark_exited."""
        rec = self.store.find(cid)
        if rec is None or rec.state != State.RUNNING:
            return
        n = cgroups.oom_kills(rec.cgroups_path)
        if n > self._ooms_seen.get(rec.id, 0):
            self._ooms_seen[rec.id] = n
            log.warning("container %s: a process in it was OOM-killed (%d so far)", cid[:12], n)
            self.hub.publish("oom", rec)

    def _unwatched(self) -> list[ContainerRecord]:
        return [
            r for r in self.store.all() if r.state == State.RUNNING and not self.ooms.watching(r.id)
        ]

    def polls_ooms(self) -> bool:
        """Whether a running container's OOM counters must be polled (no inotify watch)."""
        return bool(self._unwatched())

    def poll_ooms(self) -> None:
        for rec in self._unwatched():
            self.check_oom(rec.id)

    def _watch_ooms(self, rec: ContainerRecord) -> None:
        events = cgroups.memory_events_file(rec.cgroups_path)
        if events is not None and self.ooms.watch(rec.id, events):
            self.check_oom(rec.id)  # a kill before the watch was set
        else:
            self.oom_poll_wanted.set()

    def reap_orphans(self) -> None:
        for pid in self.reaper.reap():
            log.debug("reaped orphan %d", pid)

    def _lock(self, cid: str) -> asyncio.Lock:
        return self._locks.setdefault(cid, asyncio.Lock())

    @property
    def sandbox(self) -> Sandbox | None:
        return self.pod.current

    async def events(self) -> AsyncIterator[Event]:
        async for ev in self.hub.subscribe():
            yield ev

    def get(self, cid: str) -> ContainerRecord:
        return self.store.get(cid)

    def containers(self) -> list[ContainerRecord]:
        return sorted(self.store.all(), key=lambda r: r.created_at_ns)

    # --- sandbox -----------------------------------------------------------------------

    async def shutdown_sandbox(self, timeout: int) -> None:
        await asyncio.gather(
            *(self.stop(r.id, timeout) for r in self.store.all() if r.state != State.EXITED),
            return_exceptions=True,
        )
        for rec in self.store.all():
            await self.crun.delete(rec.id)
        await self.pod.release()
        self.shutdown_requested.set()

    # --- create / start ----------------------------------------------------------------

    async def create(self, req: agent_pb2.CreateContainerRequest) -> ContainerRecord:
        cid = req.container_id
        if not _ID.match(cid):
            raise InvalidArgument(f"invalid container id {cid!r}")
        if self.store.find(cid) is not None:
            raise AlreadyExists(f"container {cid} already exists")
        if not req.rootfs or not await asyncio.to_thread(os.path.isdir, req.rootfs):
            raise InvalidArgument(f"rootfs {req.rootfs!r} is not a directory")
        sb = await self.pod.ensure(req.sandbox_id, req.sandbox_config)
        image = image_config(req.image_config_json)
        sources = await mount_sources(req)
        target = req.config.linux.security_context.namespace_options.target_id
        target = target or req.pid_namespace_target
        target_ns = None
        if target:
            trec = self.store.get(target)
            if not trec.pid or trec.state != State.RUNNING:
                raise FailedPrecondition(f"pid namespace target {target} is not running")
            target_ns = f"/proc/{trec.pid}/ns/pid"
        cdir = self.store.dir(cid)
        rec = await write_bundle(req, sb, image, sources, target_ns, self.host, cdir)
        try:
            made = await crun_create(self.crun, rec, bool(req.config.stdin), req.config.stdin_once)
        except BaseException:
            await self.crun.delete(cid)
            await asyncio.to_thread(_rmtree, cdir)
            raise
        rec.pid = made.pid
        self._start_pump(rec.id, made)
        self._exited[cid] = asyncio.Event()
        self._creating.add(rec.pid)
        try:
            await self.store.add(rec)
        finally:
            self._creating.discard(rec.pid)
        self.exits.watch(cid, rec.pid)
        self.hub.publish("created", rec)
        return rec

    def _start_pump(self, cid: str, made: Created) -> None:
        """Log and attach plumbing of a created container, fed from its stdio fds."""
        self.sinks[cid] = made.sink
        pump = Pump(asyncio.get_running_loop(), made.sink, lambda: self._forget_pump(cid))
        pump.io = self.ios[cid] = made.io
        for fd, stream in made.stdio.read_fds:
            pump.add(fd, stream)
        self._pumps[cid] = pump

    def _forget_pump(self, cid: str) -> None:
        self._pumps.pop(cid, None)

    async def start(self, cid: str) -> ContainerRecord:
        async with self._lock(cid):
            rec = self.store.get(cid)
            if rec.state != State.CREATED:
                raise FailedPrecondition(f"container {cid} is {rec.state.value}, not created")
            r = await self.crun.run("start", cid)
            if r.rc != 0:
                raise FailedPrecondition(f"crun start: {r.stderr.decode(errors='replace')}")

            def started(x: ContainerRecord) -> None:
                x.state = State.RUNNING
                x.started_at_ns = time.time_ns()

            rec = await self.store.update(cid, started)
            self._watch_ooms(rec)
            self.hub.publish("started", rec)
            return rec

    # --- exits -------------------------------------------------------------------------

    async def _on_exit(self, cid: str, status: int | None) -> None:
        async with self._lock(cid):
            msg = "" if status is not None else "exit status lost: the agent restarted"
            await self._mark_exited(cid, status, msg)

    async def _mark_exited(self, cid: str, status: int | None, message: str) -> None:
        rec = self.store.find(cid)
        if rec is None or rec.state == State.EXITED:
            return
        ooms = cgroups.oom_kills(rec.cgroups_path)
        code = _EXIT_LOST if status is None else status

        def exited(x: ContainerRecord) -> None:
            x.state = State.EXITED
            x.finished_at_ns = time.time_ns()
            x.exit_code = code
            x.reason = "OOMKilled" if ooms else ("Completed" if code == 0 else "Error")
            x.message = message

        rec = await self.store.update(cid, exited)
        self.ooms.unwatch(cid)
        self._exited.setdefault(cid, asyncio.Event()).set()
        if ooms > self._ooms_seen.pop(cid, 0):
            self.hub.publish("oom", rec)
        self.hub.publish("exited", rec)

    async def wait(self, cid: str) -> ContainerRecord:
        self.store.get(cid)
        await self._exited.setdefault(cid, asyncio.Event()).wait()
        return self.store.get(cid)

    # --- signal / stop / remove --------------------------------------------------------

    async def signal(self, cid: str, sig: int) -> None:
        rec = self.store.get(cid)
        if rec.state == State.EXITED:
            raise FailedPrecondition(f"container {cid} is not running")
        await self.crun.kill(cid, sig)

    async def stop(self, cid: str, timeout: int) -> ContainerRecord:
        rec = self.store.get(cid)
        if rec.state == State.EXITED:
            return rec
        done = self._exited.setdefault(cid, asyncio.Event())
        if timeout > 0:
            try:
                await self.crun.kill(cid, rec.stop_signal)
                await asyncio.wait_for(done.wait(), timeout)
                return self.store.get(cid)
            except TimeoutError:
                pass
            except Exception as e:  # already gone between the check and kill
                log.debug("stop signal to %s: %s", cid, e)
        if not done.is_set():
            try:
                await self.crun.kill(cid, signal.SIGKILL, all_procs=True)
            except Exception as e:
                log.debug("SIGKILL to %s: %s", cid, e)
        try:
            await asyncio.wait_for(done.wait(), 30)
        except TimeoutError as e:
            raise FailedPrecondition(f"container {cid} did not exit after SIGKILL") from e
        return self.store.get(cid)

    async def remove(self, cid: str) -> None:
        rec = self.store.find(cid)
        if rec is None:
            return  # idempotent
        if rec.state != State.EXITED:
            await self.stop(cid, 0)
        await self.crun.delete(cid)
        pump = self._pumps.get(cid)
        if pump is not None:
            # give the pipes a moment to drain what the container wrote last
            try:
                await asyncio.wait_for(pump.done.wait(), 2)
            except TimeoutError:
                pump.close()
                self._pumps.pop(cid, None)
        self.exits.forget(cid)
        sink = self.sinks.pop(cid, None)
        if sink is not None:
            sink.notify()
        io = self.ios.pop(cid, None)
        if io is not None:
            io.close()
        await self.store.remove(cid)
        self._exited.pop(cid, None)
        self._locks.pop(cid, None)
        await asyncio.to_thread(_rmtree, self.store.dir(cid))
        self.hub.publish("removed", rec)

    # --- exec, update, stats -----------------------------------------------------------

    async def exec_sync(self, cid: str, cmd: list[str], timeout: int, limit: int) -> ExecResult:
        rec = self.store.get(cid)
        if rec.state != State.RUNNING:
            raise FailedPrecondition(f"container {cid} is not running")
        if not cmd:
            raise InvalidArgument("empty command")
        return await exec_sync(self.crun, cid, rec.bundle, self.store.dir(cid), cmd, timeout, limit)

    def start_exec(self, cid: str, cmd: list[str], tty: bool, stdin: bool) -> str:
        rec = self.store.get(cid)
        if rec.state != State.RUNNING:
            raise FailedPrecondition(f"container {cid} is not running")
        return self.execs.add(cid, cmd, tty, stdin, rec.bundle, self.store.dir(cid))

    def attach_io(self, cid: str) -> ContainerIO:
        """The container's live stdio for an attach session."""
        rec = self.store.get(cid)
        io = self.ios.get(cid)
        if io is None:
            raise FailedPrecondition(
                f"container {cid}: stdio not attachable (the agent restarted since it started)"
            )
        if rec.state == State.CREATED:
            raise FailedPrecondition(f"container {cid} is not running")
        return io

    async def exit_code(self, cid: str) -> int:
        return (await self.wait(cid)).exit_code

    async def update_resources(self, cid: str, resources: api_pb2.LinuxContainerResources) -> None:
        from criv_agent.spec.resources import update_resources

        rec = self.store.get(cid)
        if rec.state == State.EXITED:
            raise FailedPrecondition(f"container {cid} is not running")
        body = update_resources(resources, self.host.swap_accounting)
        path = os.path.join(self.store.dir(cid), "update.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(body, f)
        try:
            await self.crun.check("update", "--resources", path, cid)
        except RuntimeFailure as e:
            # the kernel refused a value (a cpuset it lacks, a limit below usage...)
            raise FailedPrecondition(f"container {cid}: resources not applied: {e}") from e
        if resources.cpu_quota < 0:
            try:
                await asyncio.to_thread(cgroups.unlimit_cpu_quota, rec.cgroups_path)
            except OSError as e:
                raise FailedPrecondition(f"container {cid}: lifting its CPU quota: {e}") from e
        res = resources_json(resources)
        await self.store.update(cid, lambda x: setattr(x, "resources", res))

    async def stats(self, ids: list[str]) -> list[tuple[str, cgroups.Stats]]:
        recs = [self.store.get(i) for i in ids] if ids else self.store.all()
        live = [r for r in recs if r.state != State.EXITED]
        results = await asyncio.to_thread(
            lambda: [(r.id, cgroups.read_stats(r.cgroups_path)) for r in live]
        )
        return results

    def close(self) -> None:
        """Agent exit without shutdown: stop reading pipes, leave containers running."""
        for pump in list(self._pumps.values()):
            pump.close()
        for io in self.ios.values():
            io.close()
        self.ios.clear()
        self.exits.close()
        self.ooms.close()


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
