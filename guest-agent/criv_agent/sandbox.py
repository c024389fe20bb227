"""The pod as the agent holds it: shared files, /dev/shm, the namespace holder, cgroup
parent. One agent serves one pod, so there is one Sandbox per agent.

Persisted as ``<state>/sandbox.json`` (versioned) so that a restarted agent finds the
holder process and its mounts again. It and the pod files are written with
atomicfile.py, from threads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
from asyncio.subprocess import Process
from dataclasses import dataclass, field

from criv_agent import cgroups
from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.atomicfile import write_atomic, write_json_atomic
from criv_agent.spare import HOLDER, SpareHolder, check_hostname, holder_argv, order_line
from criv_agent.spec.mounts import PodFiles
from criv_agent.spec.namespaces import PodNamespaces

log = logging.getLogger(__name__)

POD = api_pb2.NamespaceMode.POD
NODE = api_pb2.NamespaceMode.NODE
SANDBOX_VERSION = 1
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MNT_DETACH = 2

HOSTS_TEMPLATE = """127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
ff00::0\tip6-mcastprefix
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
"""


def resolv_conf(dns: api_pb2.DNSConfig) -> str:
    lines = []
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    lines += [f"nameserver {s}" for s in dns.servers]
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "".join(line + "\n" for line in lines)


def hosts_file(hostname: str, pod_ips: list[str]) -> str:
    return HOSTS_TEMPLATE + "".join(f"{ip}\t{hostname}\n" for ip in pod_ips if hostname)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@dataclass
class Sandbox:
    sandbox_id: str
    sandbox_dir: str
    config: api_pb2.PodSandboxConfig
    holder_pid: int = 0
    shm_mounted: bool = False
    # saves run in threads: one at a time, so an older record never lands last
    _save_lock: asyncio.Lock = field(
        default_factory=asyncio.Lock, init=False, compare=False, repr=False
    )

    @property
    def ns_options(self) -> api_pb2.NamespaceOption:
        return self.config.linux.security_context.namespace_options

    @property
    def cgroup_parent(self) -> str:
        """kubelet's cgroupfs parent when given; systemd slices are not used by crun's
        cgroupfs manager, so then criv's own tree."""
        parent = self.config.linux.cgroup_parent
        if parent and not parent.endswith(".slice"):
            return parent.rstrip("/")
        return f"/criv/{self.sandbox_id}"

    def path(self, name: str) -> str:
        return os.path.join(self.sandbox_dir, name)

    def to_json(self) -> dict[str, object]:
        return {
            "version": SANDBOX_VERSION,
            "sandbox_id": self.sandbox_id,
            "sandbox_dir": self.sandbox_dir,
            "config": base64.b64encode(self.config.SerializeToString()).decode(),
            "holder_pid": self.holder_pid,
            "shm_mounted": self.shm_mounted,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Sandbox:
        if d.get("version") != SANDBOX_VERSION:
            raise ValueError("unsupported sandbox record version")
        cfg = api_pb2.PodSandboxConfig()
        cfg.ParseFromString(base64.b64decode(str(d["config"])))
        return cls(
            str(d["sandbox_id"]), str(d["sandbox_dir"]), cfg,
            int(str(d.get("holder_pid", 0))), bool(d.get("shm_mounted")),
        )  # fmt: skip

    # --- files -------------------------------------------------------------------------

    def write_files(self, pod_ips: list[str]) -> None:
        os.makedirs(self.sandbox_dir, mode=0o755, exist_ok=True)
        cfg = self.config
        host_net = self.ns_options.network == NODE
        files = {"hostname": (cfg.hostname or os.uname().nodename) + "\n"}
        if host_net:
            files["hosts"] = _read_or(self._etc("hosts"), HOSTS_TEMPLATE)
        else:
            files["hosts"] = hosts_file(cfg.hostname, pod_ips)
        dns = cfg.dns_config
        if dns.servers or dns.searches or dns.options:
            files["resolv.conf"] = resolv_conf(dns)
        else:
            files["resolv.conf"] = _read_or(self._etc("resolv.conf"), "")
        for name, text in files.items():
            write_atomic(self.path(name), text.encode(), 0o644)

    @staticmethod
    def _etc(name: str) -> str:
        return os.path.join("/etc", name)

    def pod_files(self) -> PodFiles:
        ipc = self.ns_options.ipc
        shm = self.path("shm") if ipc == POD and self.shm_mounted else None
        if ipc == NODE:
            shm = "/dev/shm"
        return PodFiles(self.path("hostname"), self.path("hosts"), self.path("resolv.conf"), shm)

    def mount_shm(self) -> None:
        """The pod's /dev/shm, shared by its containers (IPC namespace POD)."""
        if self.shm_mounted or self.ns_options.ipc != POD:
            return
        target = self.path("shm")
        os.makedirs(target, mode=0o755, exist_ok=True)
        flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        opts = b"mode=1777,size=65536k"
        if _libc().mount(b"shm", target.encode(), b"tmpfs", flags, opts) != 0:
            raise OSError(ctypes.get_errno(), f"mount shm at {target}")
        self.shm_mounted = True

    def unmount_shm(self) -> None:
        if not self.shm_mounted:
            return
        target = self.path("shm").encode()
        if _libc().umount2(target, _MNT_DETACH) != 0 and ctypes.get_errno() != 22:
            log.warning("umount %s: %s", target, os.strerror(ctypes.get_errno()))
        self.shm_mounted = False

    # --- namespace holder --------------------------------------------------------------

    def holder_alive(self) -> bool:
        if not self.holder_pid:
            return False
        try:
            with open(f"/proc/{self.holder_pid}/cmdline", "rb") as f:
                cmd = f.read()
            ipc = os.stat(f"/proc/{self.holder_pid}/ns/ipc").st_ino
        except OSError:
            return False
        # a holder always has an IPC namespace of its own: a process in the agent's is a
        # spare not yet ordered (that got a dead holder's pid), never the pod's
        return HOLDER.encode() in cmd and ipc != _own_ipc_ns()

    def needs_holder(self) -> bool:
        o = self.ns_options
        return o.network != NODE or o.ipc == POD or o.pid == POD

    async def start_holder(self, spare: SpareHolder | None = None) -> None:
        """The pod's holder: the agent's spare (spare.py) when it has one that waits,
        else a holder started now."""
        if self.holder_alive() or not self.needs_holder():
            return
        hostname = check_hostname(self.config.hostname)
        share_pid = self.ns_options.pid == POD
        proc = spare.take() if spare is not None else None
        if proc is not None:
            if await self._order_spare(proc, hostname, share_pid):
                self.holder_pid = proc.pid
                return
            log.warning("the spare namespace holder was dead: starting a holder")
        args = [hostname, "--pid"] if share_pid else [hostname]
        errlog = self.path("holder.log")
        with open(errlog, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *holder_argv(*args),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                # the agent's process group: whoever kills the agent's group (criv
                # destroying a pod whose agent does not answer) kills the holder too
            )
        if await _answer(proc) != b"ready\n":
            await proc.wait()
            raise OSError(f"namespace holder failed: {_read_or(errlog, '').strip()}")
        self.holder_pid = proc.pid

    async def _order_spare(self, proc: Process, hostname: str, share_pid: bool) -> bool:
        """Give the spare its orders. False: it was dead, and said nothing (whatever it
        had done died with it)."""
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(order_line(hostname, share_pid))
            await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        else:
            line = await _answer(proc)
        if line == b"ready\n":
            return True
        if line:  # a failure: its message, then it exits (stderr is its stdout)
            with contextlib.suppress(TimeoutError):
                line += await asyncio.wait_for(proc.stdout.read(), 5)
        await _reap_ending(proc)
        if not line:
            return False
        msg = line.decode(errors="replace").strip()
        await asyncio.to_thread(write_atomic, self.path("holder.log"), line, 0o644)
        raise OSError(f"namespace holder failed: {msg}")

    def stop_holder(self) -> None:
        if self.holder_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.holder_pid, signal.SIGKILL)
        self.holder_pid = 0

    def namespaces(self) -> PodNamespaces:
        net = f"/proc/{os.getpid()}/ns/net" if self.ns_options.network == POD else None
        if not self.holder_alive():
            return PodNamespaces(net=net)
        p = f"/proc/{self.holder_pid}/ns"
        return PodNamespaces(
            net=net,
            ipc=f"{p}/ipc",
            uts=f"{p}/uts" if self.ns_options.network != NODE else None,
            pid=f"{p}/pid_for_children" if self.ns_options.pid == POD else None,
        )

    def release(self) -> None:
        self.stop_holder()
        self.unmount_shm()
        if self.cgroup_parent.startswith("/criv/"):
            cgroups.remove_tree_if_empty(self.cgroup_parent)

    async def save(self, state_dir: str) -> None:
        async with self._save_lock:
            data = self.to_json()  # taken on the loop: the record as it is now
            path = os.path.join(state_dir, "sandbox.json")
            await asyncio.to_thread(write_json_atomic, path, data)

    @classmethod
    def load(cls, state_dir: str) -> Sandbox | None:
        try:
            with open(os.path.join(state_dir, "sandbox.json"), encoding="utf-8") as f:
                return cls.from_json(json.load(f))
        except FileNotFoundError:
            return None


HOLDER_TIMEOUT = 10.0


async def _answer(proc: Process) -> bytes:
    """A holder's first line: ``ready``, or (EOF) that it failed; one that does not
    answer in time is killed."""
    assert proc.stdout is not None
    try:
        return await asyncio.wait_for(proc.stdout.readline(), HOLDER_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise OSError(f"namespace holder: no answer in {HOLDER_TIMEOUT:.0f}s") from None


async def _reap_ending(proc: Process, grace: float = 5.0) -> None:
    """Wait for a holder that is ending (it failed, or died); kill it only if it does not
    end in ``grace`` s. Not kill first: killing one that has exited lets Popen.poll reap it
    before asyncio's child watcher, which then reports 255, not its exit code."""
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _own_ipc_ns() -> int:
    return os.stat("/proc/self/ns/ipc").st_ino


def _read_or(path: str, default: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return default


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
