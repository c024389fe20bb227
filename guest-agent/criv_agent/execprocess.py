"""The process an exec runs: the container's own, with the exec's command.

As containerd's CRI plugin builds an exec (``execInternal``): the ``process`` object of
the container's OCI spec (user and supplemental groups, capabilities, no_new_privs,
apparmor profile, rlimits, cwd, env) with ``args`` replaced and ``terminal`` set per
request; a terminal gets ``TERM=xterm`` unless the env names a TERM. crun takes it as
``crun exec --process <file>``; without it, crun would run the command as root with
crun's default capabilities. The container's seccomp filter needs nothing here: crun
applies the one it compiled at create time to every exec of the container.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from criv_agent.errors import FailedPrecondition

_PER_EXEC_ONLY = ("consoleSize",)  # the session's terminal size, not the container's


def exec_process(spec: dict[str, Any], cmd: list[str], tty: bool) -> dict[str, Any]:
    """The container spec's process with ``cmd`` and ``tty`` (pure)."""
    base = spec.get("process")
    if not isinstance(base, dict):
        raise FailedPrecondition("the container's OCI spec has no process")
    proc = {k: v for k, v in base.items() if k not in _PER_EXEC_ONLY}
    proc["args"] = list(cmd)
    proc["terminal"] = tty
    env = [str(e) for e in proc.get("env") or []]
    if tty and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    proc["env"] = env
    return proc


def write_exec_process(bundle: str, workdir: str, cmd: list[str], tty: bool) -> str:
    """Write the exec's process JSON under ``workdir`` (blocking: call in a thread);
    returns its path, which the caller removes once crun exec has read it."""
    try:
        with open(os.path.join(bundle, "config.json"), encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise FailedPrecondition(f"cannot read the container's OCI spec: {e}") from e
    proc = exec_process(spec if isinstance(spec, dict) else {}, cmd, tty)
    fd, path = tempfile.mkstemp(prefix="exec-", suffix=".json", dir=workdir)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(proc, f)
    return path
