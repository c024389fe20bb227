"""`criv serve --daemon` and `criv stop`: criv as a service where systemd is not running.

The daemon double-forks into a session of its own, with stdin on /dev/null and stdout +
stderr appended to a log file. The command that started it waits until criv serves its
socket (or dies), so `criv serve --daemon && crictl ...` works and a failed start is
reported with the end of the log, not found later. The pid file is flock'ed for the
daemon's life: a second `--daemon` is refused at once, and the running daemon's pid file
is never overwritten. SIGTERM (`criv stop`, or `kill $(cat PIDFILE)`) is the ordinary
graceful stop; pods keep running and the next start re-adopts them.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from criv.config import Config
from criv.errors import FailedPrecondition

DEFAULT_LOG_FILE = Path("/var/log/criv.log")
READY_TIMEOUT_SECONDS = 300.0
# the daemon's own grace for calls in flight is 30 s; teardown after it is quick
STOP_TIMEOUT_SECONDS = 90.0


def default_pid_file(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "criv.pid"


@dataclass
class Detached:
    """What :func:`daemonize` returns: in the starting process ``exit_code`` is set (it
    should exit with it); in the daemon it is None and ``ready`` must be called once the
    socket is served."""

    exit_code: int | None
    _ready_fd: int = -1

    def ready(self) -> None:
        if self._ready_fd >= 0:
            # the starting command may be gone (Ctrl-C): that must not stop the daemon
            with contextlib.suppress(OSError):
                os.write(self._ready_fd, f"{os.getpid()}\n".encode())
            os.close(self._ready_fd)
            self._ready_fd = -1


def _lock_pid_file(pid_file: Path) -> int:
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(pid_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FailedPrecondition(
            f"already running (pid {_read_pid(pid_file) or '?'}): {pid_file} is locked"
        ) from None
    return fd


def _read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"
    return "\n".join(lines[-n:])


def daemonize(
    pid_file: Path, log_file: Path, ready_timeout: float = READY_TIMEOUT_SECONDS
) -> Detached:
    """Fork the daemon off. Call before any thread exists (no grpc, no asyncio yet)."""
    pid_fd = _lock_pid_file(pid_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    r, w = os.pipe()  # both ends close-on-exec: no pod process inherits them
    child = os.fork()
    if child > 0:
        os.close(w)
        os.close(log_fd)
        os.close(pid_fd)  # the daemon holds the lock through its own copy
        os.waitpid(child, 0)  # the intermediate process, gone at once
        return Detached(_wait_ready(r, log_file, pid_file, ready_timeout))
    # first child: a new session, then fork again so the daemon is no session leader and
    # can never reacquire a controlling terminal
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.ftruncate(pid_fd, 0)
    os.pwrite(pid_fd, f"{os.getpid()}\n".encode(), 0)
    os.fsync(pid_fd)
    atexit.register(_remove_pid_file, pid_file, pid_fd)
    return Detached(None, w)


def _remove_pid_file(pid_file: Path, pid_fd: int) -> None:
    # we still hold the lock, so nobody else can have written it
    if _read_pid(pid_file) == os.getpid():
        pid_file.unlink(missing_ok=True)
    os.close(pid_fd)


def _wait_ready(r: int, log_file: Path, pid_file: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            pid = _read_pid(pid_file)
            print(f"criv: not serving after {timeout:.0f} s; it keeps starting (pid {pid}).")
            print(f"criv: see {log_file}; `criv stop` stops it")
            return 1
        chunk = os.read(r, 64)
        if not chunk:
            print(f"criv: the daemon exited before serving; the end of {log_file}:")
            print(_tail(log_file))
            return 1
        data += chunk
    os.close(r)
    print(f"criv: serving (pid {int(data)}); log {log_file}; pid file {pid_file}")
    return 0


def _is_criv_serve(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serve" in argv and any(a.endswith((b"criv", b"criv.cli")) for a in argv)


def running_pid(pid_file: Path) -> int | None:
    """The pid of the `criv serve` that ``pid_file`` names, if it runs."""
    pid = _read_pid(pid_file)
    return pid if pid is not None and _is_criv_serve(pid) else None


def stop(pid_file: Path, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
    """SIGTERM the daemon named by ``pid_file`` and wait until it has exited.

    Idempotent: no pid file, or a stale one, is "not running" (exit code 0).
    """
    pid = _read_pid(pid_file)
    if pid is None:
        print(f"criv: not running (no pid in {pid_file})")
        return 0
    try:
        # a pidfd pins this process: a reused pid can neither be signalled nor waited on
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = -1
    if pidfd < 0 or not _is_criv_serve(pid):
        if pidfd >= 0:
            os.close(pidfd)
        print(f"criv: not running (stale pid file {pid_file}: pid {pid} is no criv serve)")
        return 0
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        # the pidfd becomes readable when the process has exited
        if not select.select([pidfd], [], [], timeout)[0]:
            print(f"criv: pid {pid} still running {timeout:.0f} s after SIGTERM")
            return 1
    finally:
        os.close(pidfd)
    print(f"criv: stopped (pid {pid})")
    return 0
