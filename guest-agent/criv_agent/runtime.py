"""The agent's container runtime: lifecycle through crun, exits, events, logs, stats.

Exit detection: the agent is a child subreaper (main.py), so a container's init, once
``crun create`` has exited, is the agent's child; a pidfd on it becomes readable at exit
and ``waitid(P_PIDFD)`` yields the status (signals as 128+N). A container that was
running when the agent restarted is no longer its child: its exit is still seen through
the pidfd, but the status is lost (recorded as 255 with a message).
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
from dataclasses import dataclass
from typing import Any

from criv_agent import cgroups
from criv_agent.attach import ContainerIO
from criv_agent.crun import Crun, cgroup_version
from criv_agent.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from criv_agent.execstream import ExecRegistry
from criv_agent.execsync import ExecResult, exec_sync
from criv_agent.reaper import Reaper
from criv_agent.sandbox import Sandbox
from criv_agent.spec import HostInfo, SpecInput, build_spec, image_config, stop_signal
from criv_agent.state import ContainerRecord, ContainerStore, State
from criv_agent.stdio import LogSink, Pump, Stdio

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_EXIT_LOST = 255


@dataclass
class Event:
    kind: str  # created, started, exited, oom, removed
    container_id: str
    timestamp_ns: int
    record: ContainerRecord


def host_info() -> HostInfo:
    v2 = cgroup_version() == "v2"
    if v2:
        swap = _any_swap_v2()
    else:
        swap = os.path.exists("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes")
    bounding = (1 << 41) - 1
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapBnd:"):
                    bounding = int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return HostInfo(cgroup_v2=v2, swap_accounting=swap, cap_bounding=bounding)


def _any_swap_v2() -> bool:
    """memory.swap.max exists only below the root, and only with swap accounting."""
    try:
        dirs = [e.path for e in os.scandir("/sys/fs/cgroup") if e.is_dir()]
    except OSError:
        return False
    return any(os.path.exists(os.path.join(d, "memory.swap.max")) for d in dirs)


class Runtime:
    def __init__(self, state_dir: str, crun_binary: str) -> None:
        self.state_dir = state_dir
        self.crun = Crun(crun_binary, os.path.join(state_dir, "crun"))
        self.store = ContainerStore(os.path.join(state_dir, "containers"))
        self.host = host_info()
        self.sandbox: Sandbox | None = None
        self.sinks: dict[str, LogSink] = {}
        self._pumps: dict[str, Pump] = {}
        # live stdio for attach; absent after an agent restart (the pipes died with it)
        self.ios: dict[str, ContainerIO] = {}
        self._exited: dict[str, asyncio.Event] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._pidfds: dict[str, int] = {}
        self._subscribers: list[asyncio.Queue[Event]] = []
        self.shutdown_requested = asyncio.Event()
        self._bg: set[asyncio.Future[None]] = set()
        self.reaper = Reaper(self._container_pids)
        self._sandbox_lock = asyncio.Lock()
        self._ooms_seen: dict[str, int] = {}
        self.execs = ExecRegistry(self.crun)

    # --- startup -----------------------------------------------------------------------

    async def load(self) -> None:
        """Reload records after an agent restart and re-watch what still runs."""
        self.sandbox = Sandbox.load(self.state_dir)
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
                self._watch(rec.id, rec.pid)
                continue
            self._mark_exited(rec.id, None, "exit status lost: the agent restarted")
        # crun containers without a record: the agent died between crun create and
        # writing the record; nobody knows them, so they go
        known = {r.id for r in self.store.all()}
        for cid in await self.crun.list_ids():
            if cid not in known:
                log.warning("deleting crun container %s that has no record", cid)
                await self.crun.delete(cid)

    # --- helpers -----------------------------------------------------------------------

    def _container_pids(self) -> set[int]:
        return {r.pid for r in self.store.all() if r.state != State.EXITED}

    def check_ooms(self) -> None:
        """OOM kills inside still-running containers (a child killed, init alive) become
        OOM events as they happen; one at exit is reported by _mark_exited."""
        for rec in self.store.all():
            if rec.state != State.RUNNING:
                continue
            n = cgroups.oom_kills(rec.cgroups_path)
            if n > self._ooms_seen.get(rec.id, 0):
                self._ooms_seen[rec.id] = n
                self._publish("oom", rec)

    def reap_orphans(self) -> None:
        for pid in self.reaper.reap():
            log.debug("reaped orphan %d", pid)

    def _lock(self, cid: str) -> asyncio.Lock:
        return self._locks.setdefault(cid, asyncio.Lock())

    def _publish(self, kind: str, rec: ContainerRecord) -> None:
        ev = Event(kind, rec.id, time.time_ns(), rec)
        for q in self._subscribers:
            q.put_nowait(ev)

    async def events(self) -> AsyncIterator[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._subscribers.remove(q)

    def get(self, cid: str) -> ContainerRecord:
        return self.store.get(cid)

    def containers(self) -> list[ContainerRecord]:
        return sorted(self.store.all(), key=lambda r: r.created_at_ns)

    # --- sandbox -----------------------------------------------------------------------

    async def setup_sandbox(
        self, sandbox_id: str, config: Any, sandbox_dir: str, pod_ips: list[str]
    ) -> Sandbox:
        async with self._sandbox_lock:
            return await self._setup_sandbox_locked(sandbox_id, config, sandbox_dir, pod_ips)

    async def _setup_sandbox_locked(
        self, sandbox_id: str, config: Any, sandbox_dir: str, pod_ips: list[str]
    ) -> Sandbox:
        sb = self.sandbox
        if sb is not None and sb.sandbox_id != sandbox_id:
            raise FailedPrecondition(f"this agent serves sandbox {sb.sandbox_id}")
        if sb is None:
            sb = Sandbox(sandbox_id, sandbox_dir or os.path.join(self.state_dir, "sandbox"),
                         config)  # fmt: skip
        else:
            sb.config = config
        await asyncio.to_thread(sb.write_files, pod_ips)
        await asyncio.to_thread(sb.mount_shm)
        self.sandbox = sb
        try:
            await sb.start_holder()
        finally:
            sb.save(self.state_dir)
        return sb

    async def _ensure_sandbox(self, sandbox_id: str, config: Any) -> Sandbox:
        """The sandbox for CreateContainer: set up now if SetupSandbox never came."""
        async with self._sandbox_lock:
            sb = self.sandbox
            if sb is None:
                return await self._setup_sandbox_locked(sandbox_id, config, "", [])
            if sb.sandbox_id != sandbox_id:
                raise FailedPrecondition(f"this agent serves sandbox {sb.sandbox_id}")
            if sb.needs_holder() and not sb.holder_alive():
                await sb.start_holder()  # it died (or the node rebooted): a new one
                sb.save(self.state_dir)
            return sb

    async def shutdown_sandbox(self, timeout: int) -> None:
        await asyncio.gather(
            *(self.stop(r.id, timeout) for r in self.store.all() if r.state != State.EXITED),
            return_exceptions=True,
        )
        for rec in self.store.all():
            await self.crun.delete(rec.id)
        if self.sandbox is not None:
            await asyncio.to_thread(self.sandbox.release)
            self.sandbox.save(self.state_dir)
        self.shutdown_requested.set()

    # --- create / start ----------------------------------------------------------------

    async def create(self, req: Any) -> ContainerRecord:
        cid = req.container_id
        if not _ID.match(cid):
            raise InvalidArgument(f"invalid container id {cid!r}")
        if self.store.find(cid) is not None:
            raise AlreadyExists(f"container {cid} already exists")
        if not req.rootfs or not os.path.isdir(req.rootfs):
            raise InvalidArgument(f"rootfs {req.rootfs!r} is not a directory")
        sb = await self._ensure_sandbox(req.sandbox_id, req.sandbox_config)
        image = image_config(req.image_config_json)
        mounts = {m.container_path: m.agent_path for m in req.mounts}
        sources = [mounts.get(m.container_path, m.host_path) for m in req.config.mounts]
        for src in sources:
            if not os.path.exists(src):
                os.makedirs(src, exist_ok=True)  # containerd creates missing host paths
        target = req.config.linux.security_context.namespace_options.target_id
        target = target or req.pid_namespace_target
        target_ns = None
        if target:
            trec = self.store.get(target)
            if not trec.pid or trec.state != State.RUNNING:
                raise FailedPrecondition(f"pid namespace target {target} is not running")
            target_ns = f"/proc/{trec.pid}/ns/pid"
        cdir = self.store.dir(cid)
        bundle = os.path.join(cdir, "bundle")
        inp = SpecInput(
            container_id=cid,
            config=req.config,
            sandbox_config=sb.config,
            image=image,
            rootfs=req.rootfs,
            mount_sources=sources,
            cgroups_path=f"{sb.cgroup_parent}/{cid}",
            pod_files=sb.pod_files(),
            pod_ns=sb.namespaces(),
            target_pid_ns=target_ns,
            host=self.host,
        )
        spec = await asyncio.to_thread(build_spec, inp)
        os.makedirs(bundle, mode=0o700, exist_ok=True)
        with open(os.path.join(bundle, "config.json"), "w", encoding="utf-8") as f:
            json.dump(spec, f)
        rec = ContainerRecord(
            id=cid,
            sandbox_id=sb.sandbox_id,
            created_at_ns=time.time_ns(),
            tty=bool(req.config.tty),
            stop_signal=stop_signal(image),
            cgroups_path=inp.cgroups_path,
            bundle=bundle,
            log_path=os.path.join(cdir, "container.log"),
            resources=_resources_json(req.config.linux.resources),
        )
        try:
            rec.pid = await self._crun_create(rec, bool(req.config.stdin), req.config.stdin_once)
        except BaseException:
            await self.crun.delete(cid)
            _rmtree(cdir)
            self.sinks.pop(cid, None)
            raise
        self._exited[cid] = asyncio.Event()
        self.store.add(rec)
        self._watch(cid, rec.pid)
        self._publish("created", rec)
        return rec

    async def _crun_create(self, rec: ContainerRecord, stdin: bool, stdin_once: bool) -> int:
        stdio = Stdio(rec.tty, stdin)
        sink = LogSink(rec.log_path)
        pidfile = os.path.join(os.path.dirname(rec.bundle), "pid")
        args = ["create", "--bundle", rec.bundle, "--pid-file", pidfile]
        if rec.tty:
            args += ["--console-socket", stdio.console_path]
        try:
            if stdio.tty:
                proc = await self.crun.spawn([*args, rec.id])
                console = asyncio.ensure_future(stdio.receive_console(30))
                out, err = await proc.communicate()
                if proc.returncode == 0:
                    await console
                else:
                    console.cancel()
            else:
                proc = await self.crun.spawn(
                    [*args, rec.id],
                    stdin=stdio.stdin_child if stdin else asyncio.subprocess.DEVNULL,
                    stdout=stdio.child_fds[0],
                    stderr=stdio.child_fds[1],
                )
                out, err = b"", b""
                await proc.wait()
            stdio.close_child_side()
            if proc.returncode != 0:
                msg = _crun_error(out, err, stdio)
                raise FailedPrecondition(f"crun create: {msg}")
            with open(pidfile, encoding="ascii") as f:
                pid = int(f.read().strip())
        except BaseException:
            stdio.close_all()
            raise
        sink.open(stdio.streams)
        self.sinks[rec.id] = sink
        pump = Pump(asyncio.get_running_loop(), sink, lambda: self._forget_pump(rec.id))
        pump.io = self.ios[rec.id] = _container_io(stdio, stdin, stdin_once)
        for fd, stream in stdio.read_fds:
            pump.add(fd, stream)
        self._pumps[rec.id] = pump
        return pid

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

            rec = self.store.update(cid, started)
            self._publish("started", rec)
            return rec

    # --- exits -------------------------------------------------------------------------

    def _watch(self, cid: str, pid: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._exit_seen(cid, None)
            return
        self._pidfds[cid] = fd
        loop.add_reader(fd, self._pidfd_ready, cid, fd)

    def _pidfd_ready(self, cid: str, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        status: int | None = None
        try:
            res = os.waitid(os.P_PIDFD, fd, os.WEXITED)
            if res is not None:
                code, st = res.si_code, res.si_status
                status = st if code == os.CLD_EXITED else 128 + st
        except ChildProcessError:
            status = None  # not our child any more (agent restarted): status lost
        os.close(fd)
        self._pidfds.pop(cid, None)
        self._exit_seen(cid, status)

    def _exit_seen(self, cid: str, status: int | None) -> None:
        task = asyncio.ensure_future(self._on_exit(cid, status))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _on_exit(self, cid: str, status: int | None) -> None:
        async with self._lock(cid):
            msg = "" if status is not None else "exit status lost: the agent restarted"
            self._mark_exited(cid, status, msg)

    def _mark_exited(self, cid: str, status: int | None, message: str) -> None:
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

        rec = self.store.update(cid, exited)
        self._exited.setdefault(cid, asyncio.Event()).set()
        if ooms > self._ooms_seen.pop(cid, 0):
            self._publish("oom", rec)
        self._publish("exited", rec)

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
        fd = self._pidfds.pop(cid, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
        sink = self.sinks.pop(cid, None)
        if sink is not None:
            sink.notify()
        io = self.ios.pop(cid, None)
        if io is not None:
            io.close()
        self.store.remove(cid)
        self._exited.pop(cid, None)
        self._locks.pop(cid, None)
        _rmtree(self.store.dir(cid))
        self._publish("removed", rec)

    # --- exec, update, stats -----------------------------------------------------------

    async def exec_sync(self, cid: str, cmd: list[str], timeout: int, limit: int) -> ExecResult:
        rec = self.store.get(cid)
        if rec.state != State.RUNNING:
            raise FailedPrecondition(f"container {cid} is not running")
        if not cmd:
            raise InvalidArgument("empty command")
        return await exec_sync(self.crun, cid, self.store.dir(cid), cmd, timeout, limit)

    def start_exec(self, cid: str, cmd: list[str], tty: bool, stdin: bool) -> str:
        rec = self.store.get(cid)
        if rec.state != State.RUNNING:
            raise FailedPrecondition(f"container {cid} is not running")
        return self.execs.add(cid, cmd, tty, stdin, self.store.dir(cid))

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

    async def update_resources(self, cid: str, resources: Any) -> None:
        from criv_agent.spec.resources import update_resources

        rec = self.store.get(cid)
        if rec.state == State.EXITED:
            raise FailedPrecondition(f"container {cid} is not running")
        body = update_resources(resources, self.host.swap_accounting)
        path = os.path.join(self.store.dir(cid), "update.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(body, f)
        await self.crun.check("update", "--resources", path, cid)
        res = _resources_json(resources)
        self.store.update(cid, lambda x: setattr(x, "resources", res))

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
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds.clear()


def _container_io(stdio: Stdio, stdin: bool, stdin_once: bool) -> ContainerIO:
    """Takes the agent's stdin end (non-tty) or dups of the pty master (tty) from ``stdio``."""
    if not stdio.tty:
        fd, stdio.stdin_fd = stdio.stdin_fd, None
        return ContainerIO(False, stdin_once, fd, None)
    master = stdio.read_fds[0][0]
    return ContainerIO(True, stdin_once, os.dup(master) if stdin else None, os.dup(master))


def _resources_json(r: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    d: dict[str, Any] = json_format.MessageToDict(r, preserving_proto_field_name=True)
    return d


def _crun_error(out: bytes, err: bytes, stdio: Stdio) -> str:
    text = (err or out).decode(errors="replace").strip()
    if not text and stdio.read_fds and not stdio.tty:
        # crun create's own message went to the container's stderr pipe
        fd = stdio.read_fds[1][0]
        os.set_blocking(fd, False)
        try:
            text = os.read(fd, 4096).decode(errors="replace").strip()
        except BlockingIOError:
            text = ""
    return text or "failed"


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
