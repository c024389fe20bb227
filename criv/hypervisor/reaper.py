"""Run a daemon (libvirtd) under a child subreaper that reaps orphans at once.

libvirt daemonizes each QEMU, so a QEMU's parent is whoever adopts orphans: PID 1, or
the nearest living ancestor marked a child subreaper. libvirt counts a domain as stopped
only once its QEMU's pid is gone (it polls ``kill(pid, 0)``), that is once the process
has been reaped. systemd reaps at once; a container's PID 1 may not (1.1-1.8 s here),
and then every VM stop and destroy waits for it. criv's host set-up starts libvirtd under
this reaper where it starts libvirtd itself (no systemd).

Usage: ``python reaper.py [--detach] libvirtd [args...]`` (a script; of criv's code it
imports only the agent's ``set_subreaper``, which criv's venv has). With ``--detach`` it
forks into the background first, stdio on /dev/null, as ``libvirtd -d`` would. The daemon
runs in the foreground as the reaper's child; SIGTERM, SIGINT and SIGHUP are passed on to
it; the reaper exits with the daemon's status once the daemon exits (QEMUs still running
are then adopted by PID 1 again, as before).
"""

from __future__ import annotations

import os
import signal
import sys

from criv_agent.main import set_subreaper

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def supervise(argv: list[str]) -> int:
    """Spawn ``argv`` and reap every child until it exits; its exit code."""
    set_subreaper()
    daemon = os.posix_spawnp(argv[0], argv, dict(os.environ))
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _f: os.kill(daemon, s))
    while True:
        try:
            pid, status = os.wait()  # an orphan adopted from the daemon's tree, or the daemon
        except ChildProcessError:  # nothing left (the daemon was reaped by someone else)
            return 0
        if pid == daemon:
            return os.waitstatus_to_exitcode(status)


def detach() -> bool:
    """Fork into the background; True in the child, which goes on."""
    if os.fork() != 0:
        return False
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    background = bool(args) and args[0] == "--detach"
    args = args[1:] if background else args
    if not args:
        print("usage: reaper.py [--detach] DAEMON [ARGS...]", file=sys.stderr)
        return 2
    if background and not detach():
        return 0
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
