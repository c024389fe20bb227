"""Creating a container, the part before the Runtime's bookkeeping: the OCI bundle and
``crun create`` with the container's stdio.

File system work runs in threads, never on the event loop: in a ``vm`` pod the rootfs and
volumes sit on the pod's 9p share, where every stat or mkdir is a round trip to the host,
and a slow one would stall every other call and stream the agent serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from criv_agent import podsysctl
from criv_agent.attach import ContainerIO
from criv_agent.crun import Crun
from criv_agent.errors import FailedPrecondition
from criv_agent.sandbox import Sandbox
from criv_agent.spec import HostInfo, SpecInput, build_spec, stop_signal
from criv_agent.spec.submounts import read_mountinfo
from criv_agent.spec.userns import user_namespace
from criv_agent.state import ContainerRecord
from criv_agent.stdio import LogSink, Stdio

if TYPE_CHECKING:
    from criv_agent.api.agent.v1 import agent_pb2
    from criv_agent.api.runtime.v1 import api_pb2


@dataclass
class Created:
    """A container ``crun create`` made: its init's pid and the stdio the agent keeps."""

    pid: int
    stdio: Stdio
    sink: LogSink  # opened on the container's log file
    io: ContainerIO


async def mount_sources(req: agent_pb2.CreateContainerRequest) -> list[str]:
    """Each CRI mount's source as the agent reaches it; missing ones are created, as
    containerd does for host paths."""
    mounts = {m.container_path: m.agent_path for m in req.mounts}
    sources = [mounts.get(m.container_path, m.host_path) for m in req.config.mounts]
    await asyncio.to_thread(_make_missing, sources)
    return sources


def _make_missing(paths: list[str]) -> None:
    for path in paths:
        if not os.path.exists(path):
            os.makedirs(path, exist_ok=True)


async def write_bundle(
    req: agent_pb2.CreateContainerRequest,
    sb: Sandbox,
    image: dict[str, Any],
    sources: list[str],
    target_pid_ns: str | None,
    host: HostInfo,
    cdir: str,
) -> ContainerRecord:
    """Write the OCI bundle under ``cdir``; returns the record to create it with (no pid)."""
    cid = req.container_id
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
        target_pid_ns=target_pid_ns,
        host=host,
        seccomp_profile=req.seccomp_profile_json,
    )
    user = await asyncio.to_thread(_write_spec, inp, bundle)
    opts = req.config.linux.security_context.namespace_options
    if user_namespace(opts) is not None:  # crun could not write them from inside it
        await podsysctl.apply(dict(sb.config.linux.sysctls), opts, inp.pod_ns)
    return ContainerRecord(
        id=cid,
        sandbox_id=sb.sandbox_id,
        created_at_ns=time.time_ns(),
        tty=bool(req.config.tty),
        stop_signal=stop_signal(image),
        cgroups_path=inp.cgroups_path,
        bundle=bundle,
        log_path=os.path.join(cdir, "container.log"),
        resources=resources_json(req.config.linux.resources),
        user=user,
    )


def _write_spec(inp: SpecInput, bundle: str) -> dict[str, Any]:
    """Write ``config.json``; returns the spec's process user (ids as resolved)."""
    if inp.config.mounts:
        inp.mountinfo = read_mountinfo()  # the volumes' sub-mounts, as they are now
    spec = build_spec(inp)  # reads the rootfs's /etc/passwd and /etc/group
    os.makedirs(bundle, mode=0o700, exist_ok=True)
    with open(os.path.join(bundle, "config.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    user: dict[str, Any] = spec["process"]["user"]
    return user


def resources_json(r: api_pb2.LinuxContainerResources) -> dict[str, Any]:
    """CRI resources as the record keeps them (JSON, proto field names)."""
    from google.protobuf import json_format

    d: dict[str, Any] = json_format.MessageToDict(r, preserving_proto_field_name=True)
    return d


async def crun_create(crun: Crun, rec: ContainerRecord, stdin: bool, stdin_once: bool) -> Created:
    """``crun create`` from ``rec.bundle``; the caller deletes what is left if this raises."""
    stdio = Stdio(rec.tty, stdin)
    sink = LogSink(rec.log_path)
    pidfile = os.path.join(os.path.dirname(rec.bundle), "pid")
    args = ["create", "--bundle", rec.bundle, "--pid-file", pidfile]
    if rec.tty:
        args += ["--console-socket", stdio.console_path]
    try:
        if stdio.tty:
            proc = await crun.spawn([*args, rec.id])
            console = asyncio.ensure_future(stdio.receive_console(30))
            out, err = await proc.communicate()
            if proc.returncode == 0:
                await console
            else:
                console.cancel()
        else:
            proc = await crun.spawn(
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
        pid = await asyncio.to_thread(_read_pid, pidfile)
    except BaseException:
        stdio.close_all()
        raise
    sink.open(stdio.streams)
    return Created(pid, stdio, sink, _container_io(stdio, stdin, stdin_once))


def _read_pid(pidfile: str) -> int:
    with open(pidfile, encoding="ascii") as f:
        return int(f.read().strip())


def _container_io(stdio: Stdio, stdin: bool, stdin_once: bool) -> ContainerIO:
    """Takes the agent's stdin end (non-tty) or dups of the pty master (tty) from ``stdio``."""
    if not stdio.tty:
        fd, stdio.stdin_fd = stdio.stdin_fd, None
        return ContainerIO(False, stdin_once, fd, None)
    master = stdio.read_fds[0][0]
    return ContainerIO(True, stdin_once, os.dup(master) if stdin else None, os.dup(master))


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
