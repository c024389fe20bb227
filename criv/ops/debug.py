"""`criv debug POD [-c COMMAND]`: an operator's shell in a pod's sandbox, outside any
container, recorded in criv's audit log.

Host-mode pods only: the shell joins the network namespace of the pod's agent (the pod
netns) and the UTS/IPC namespaces of its namespace holder (hostname, SysV IPC), found as
the agent's child. The mount and pid namespaces stay the host's: a host pod's
containers each have their own, and criv's tools live on the host.

vm pods are refused: a shell in the guest outside any container needs a new agent
call (and a guest image that has it); nothing in the guest answers such a request
today. `criv console` shows a vm pod's console; `crictl exec` enters a container.

Every session is recorded before it starts and when it ends (who, which pod, the
command, its exit status) as one JSON line in ``<state_dir>/audit.log`` (0600), and on
the host's syslog where there is one.
"""

from __future__ import annotations

import getpass
import json
import logging
import logging.handlers
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from criv.config import Config
from criv.cri.client import CriClient, PodView
from criv.errors import FailedPrecondition, Unimplemented
from criv.ops import procinfo
from criv.procscan import same_process

log = logging.getLogger("criv.audit")

VM_REFUSED = (
    "criv debug works for host-mode pods only: a shell inside a pod VM (outside its "
    "containers) needs an agent call criv-agent does not have yet; use `criv console "
    "{pod}` to follow the VM's console, or `crictl exec -it CONTAINER sh` inside a container"
)


def audit_path(cfg: Config) -> Path:
    return Path(cfg.state_dir) / "audit.log"


def _who() -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    return {"uid": os.getuid(), "user": user, "sudoUser": os.environ.get("SUDO_USER", "")}


def audit(cfg: Config, event: str, **fields: Any) -> None:
    """One audit record: appended to the audit log (created 0600) and sent to syslog."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event}
    entry.update(_who())
    entry.update(fields)
    line = json.dumps(entry, sort_keys=True)
    path = audit_path(cfg)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)
    if Path("/dev/log").exists():
        try:
            handler = logging.handlers.SysLogHandler(address="/dev/log")
        except OSError:
            return
        try:
            handler.handle(log.makeRecord(log.name, logging.WARNING, "", 0, line, (), None))
        finally:
            handler.close()


def holder_of(agent_pid: int) -> int:
    """The agent's namespace holder (its child ``criv_agent.holder``), 0 if none."""
    for task in Path(f"/proc/{agent_pid}/task").glob("*/children"):
        try:
            children = task.read_text().split()
        except OSError:
            continue
        for child in children:
            args = procinfo.argv(int(child))
            if any("criv_agent.holder" in a or "criv_agent/holder" in a for a in args):
                if _same_ns(agent_pid, int(child), "ipc"):
                    continue  # the agent's spare holder, not (yet) the pod's
                return int(child)
    return 0


def _same_ns(a: int, b: int, ns: str) -> bool:
    try:
        return os.stat(f"/proc/{a}/ns/{ns}").st_ino == os.stat(f"/proc/{b}/ns/{ns}").st_ino
    except OSError:
        return False


def nsenter_argv(agent_pid: int, holder_pid: int, command: list[str]) -> list[str]:
    argv = ["nsenter", f"--net=/proc/{agent_pid}/ns/net"]
    if holder_pid:
        argv += [f"--uts=/proc/{holder_pid}/ns/uts", f"--ipc=/proc/{holder_pid}/ns/ipc"]
    return [*argv, "--", *command]


def agent_pid(pod: PodView) -> int:
    if pod.mode == "vm":
        raise Unimplemented(VM_REFUSED.format(pod=pod.id[:13]))
    if pod.mode != "host":
        raise FailedPrecondition(f"criv debug: pods in {pod.mode!r} isolation are not supported")
    st = pod.isolation_state
    pid, start = st.get("pid"), st.get("start_time")
    if not isinstance(pid, int) or not isinstance(start, int) or not same_process(pid, start):
        raise FailedPrecondition(f"pod {pod.id[:13]} has no running agent (state {pod.state})")
    return pid


def debug_command(cfg: Config, target: str, command: list[str]) -> int:
    if shutil.which("nsenter") is None:
        raise FailedPrecondition("criv debug needs nsenter (util-linux)")
    with CriClient(cfg.socket_path) as cri:
        pod = cri.pod(target)
    pid = agent_pid(pod)
    cmd = command or [os.environ.get("SHELL") or "/bin/sh"]
    argv = nsenter_argv(pid, holder_of(pid), cmd)
    who = {"pod": pod.id, "name": pod.name, "namespace": pod.namespace, "command": cmd}
    audit(cfg, "debug-start", **who)
    rc = -1
    # Ctrl-C belongs to the shell (it interrupts what runs in it), not to this session:
    # a Python handler, unlike SIG_IGN, is reset to the default in the exec'd child.
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        env = dict(os.environ, PS1=f"criv-debug {pod.namespace}/{pod.name}# ")
        rc = subprocess.Popen(argv, env=env).wait()
        return rc
    finally:
        signal.signal(signal.SIGINT, previous)
        audit(cfg, "debug-end", exitStatus=rc, **who)
