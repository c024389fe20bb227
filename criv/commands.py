"""Run a host command from the event loop without blocking it, and never for ever.

Every command gets a deadline (per program: :data:`DEFAULT_TIMEOUTS`, overridden by the
``timeouts.commands`` config key through :func:`configure_timeouts`, or by the caller).
It runs as the leader of a process group of its own, so at the deadline, or when the
awaiting task is cancelled, the whole group gets SIGKILL and the child is reaped: a hung
``umount`` cannot hold a pod's lock for ever, and a caller that gave up leaves nothing
running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping

from criv.errors import CommandTimeout

log = logging.getLogger("criv.commands")

# Seconds, by program name (basename of argv[0]). Quick kernel calls get a tight bound;
# mkfs of a big sparse image and crun (which may wait for a container's processes to
# die) get more. Anything else: DEFAULT_KEY.
DEFAULT_KEY = "default"
DEFAULT_TIMEOUTS: dict[str, float] = {
    DEFAULT_KEY: 60.0,
    "mount": 30.0,
    "umount": 30.0,
    "unshare": 30.0,
    "nsenter": 30.0,
    "ip": 30.0,
    "tc": 30.0,
    "iptables": 30.0,
    "losetup": 30.0,
    "mkfs.ext4": 120.0,
    "crun": 60.0,
}
_timeouts: dict[str, float] = dict(DEFAULT_TIMEOUTS)
# the most of a timed-out command's line quoted in its error
_MAX_QUOTED = 200


def configure_timeouts(overrides: Mapping[str, float]) -> None:
    """Apply the ``timeouts.commands`` config (program name -> seconds) for this process."""
    _timeouts.clear()
    _timeouts.update(DEFAULT_TIMEOUTS)
    _timeouts.update({k: float(v) for k, v in overrides.items()})


def timeout_for(program: str) -> float:
    """The deadline of ``program`` (a path or a name) in seconds."""
    name = os.path.basename(program)
    return _timeouts.get(name, _timeouts[DEFAULT_KEY])


def quote(argv: tuple[str, ...] | list[str]) -> str:
    line = shlex.join(argv)
    return line if len(line) <= _MAX_QUOTED else line[:_MAX_QUOTED] + "..."


def kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL ``proc``'s process group (it leads one: ``start_new_session``)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Kill and wait for ``proc``. Shielded: a second cancellation of the caller
    interrupts only the wait (the kill is sent; asyncio's child watcher reaps it)."""
    kill_group(proc)
    await asyncio.shield(proc.wait())


async def run_command(
    *argv: str, merge_stderr: bool = True, timeout: float | None = None, stdin: bytes = b""
) -> tuple[int, str]:
    """Run ``argv`` (``stdin`` on its standard input); return (exit code, output stripped).

    ``merge_stderr`` folds stderr into the output (for error messages); turn it off when
    stdout is parsed and warnings on stderr would pollute it. ``timeout`` (seconds)
    overrides the program's configured deadline; past it the command's process group is
    killed and :class:`~criv.errors.CommandTimeout` (DEADLINE_EXCEEDED) names it.
    """
    limit = timeout if timeout is not None else timeout_for(argv[0])
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its own group: the kill reaches what it started
    )
    try:
        async with asyncio.timeout(limit) as cm:
            out, _ = await proc.communicate(stdin or None)
    except TimeoutError:
        await reap(proc)
        if not cm.expired():
            raise
        log.error("%s: no answer in %gs; killed", quote(argv), limit)
        raise CommandTimeout(
            f"host command {os.path.basename(argv[0])!r} did not finish in {limit:g}s and "
            f"was killed: {quote(argv)}"
        ) from None
    except BaseException:
        await reap(proc)  # the caller was cancelled: leave nothing running
        raise
    return proc.returncode or 0, out.decode(errors="replace").strip()


def run_sync(
    argv: list[str], *, check: bool = False, capture: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """:func:`run_command` for blocking code (CLI, host setup): the same deadlines and
    group kill. ``capture=False`` leaves stdout/stderr to the caller's (use it for a
    command that daemonizes: its daemon would hold the pipes open). ``check`` raises
    CalledProcessError on a non-zero exit, as ``subprocess.run``."""
    limit = timeout if timeout is not None else timeout_for(argv[0])
    pipe = subprocess.PIPE if capture else None
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe, text=True,
        start_new_session=True,
    ) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise CommandTimeout(
                f"host command {os.path.basename(argv[0])!r} did not finish in {limit:g}s "
                f"and was killed: {quote(argv)}"
            ) from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def spawn_detached(argv: list[str], log_path: str | os.PathLike[str]) -> subprocess.Popen[bytes]:
    """Start a long-lived helper (the host agent, virtiofsd) in a session of its own, so it
    outlives a criv restart and its group can be killed, with its output appended to
    ``log_path``. No deadline: it runs until criv stops it."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
