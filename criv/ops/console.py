"""`criv console POD`: follow a vm pod's serial console, read-only.

The console log is the file the pod's record names (``isolationState.console_log``);
libvirt (virtlogd) writes it and may rotate it, so the follower reopens the path when
its inode changes or it shrinks. The guest writes every byte of it and the guest is
hostile: control characters (terminal escapes) are shown escaped unless ``--raw``.

Interactive attach (``--rw``) is refused: the guest runs no shell or getty on its serial
port (images/init hands the console to criv-agent, which never reads it), so there is
nothing to type to. `criv debug` is the way into a pod (host pods only, for now).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from criv.config import Config
from criv.cri.client import CriClient, PodView
from criv.errors import FailedPrecondition, NotFound

POLL_SECONDS = 0.2
CHECK_POD_SECONDS = 2.0
CHUNK = 64 * 1024
# Initial tail: the last lines of at most this many bytes (the guest sizes the file).
TAIL_BYTES = 256 * 1024

RW_REFUSED = (
    "criv console --rw is not supported: the pod VM runs no shell or getty on its serial "
    "console (the guest's init gives it to criv-agent, which does not read it), so there "
    "is nothing to type to; follow it read-only with `criv console POD`, and use "
    "`criv debug POD` for a shell (host-mode pods only for now)"
)

_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


def sanitize(data: bytes) -> bytes:
    """Show control bytes (but newline and tab) as ``\\xNN``: no terminal escapes."""
    return _CONTROL.sub(lambda m: b"\\x%02x" % m.group()[0], data.replace(b"\r\n", b"\n"))


def console_path(pod: PodView) -> Path:
    if pod.mode != "vm":
        hint = f"; its agent log is {pod.state_dir / 'agent.log'}" if pod.state_dir else ""
        raise FailedPrecondition(
            f"pod {pod.id[:13]} runs in {pod.mode!r} isolation: it has no VM console{hint}"
        )
    path = pod.isolation_state.get("console_log")
    if not isinstance(path, str) or not path:
        raise NotFound(f"pod {pod.id[:13]} has no console log (its VM did not boot)")
    return Path(path)


def tail_lines(data: bytes, lines: int) -> bytes:
    if lines <= 0:
        return b""
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
        return b"\n".join(parts[-lines:]) + b"\n"
    return b"\n".join(parts[-lines:])


class Follower:
    """Reads what is appended to ``path``, across rotation (new inode) and truncation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: BinaryIO | None = None
        self._ino = -1

    def open_at_tail(self, nbytes: int) -> bytes:
        self._f = open(self.path, "rb")  # noqa: SIM115  (kept open while following)
        st = os.fstat(self._f.fileno())
        self._ino = st.st_ino
        self._f.seek(max(0, st.st_size - nbytes))
        return self._f.read(nbytes)

    def read_new(self) -> bytes:
        assert self._f is not None
        data = self._f.read(CHUNK)
        if data:
            return data
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return b""  # mid-rotation: the new file comes next
        if st.st_ino != self._ino or st.st_size < self._f.tell():
            self._f.close()
            self._f = open(self.path, "rb")  # noqa: SIM115
            self._ino = os.fstat(self._f.fileno()).st_ino
            return self._f.read(CHUNK)
        return b""

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def follow(
    follower: Follower,
    write: Callable[[bytes], None],
    still_running: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Copy new console output to ``write`` until the pod stops (then drain once)."""
    next_check = clock() + CHECK_POD_SECONDS
    while True:
        data = follower.read_new()
        if data:
            write(data)
            continue
        if clock() >= next_check:
            if not still_running():
                while data := follower.read_new():
                    write(data)
                return
            next_check = clock() + CHECK_POD_SECONDS
        time.sleep(POLL_SECONDS)


def console_command(
    cfg: Config, target: str, *, rw: bool, lines: int, no_follow: bool, raw: bool
) -> int:
    if rw:
        raise FailedPrecondition(RW_REFUSED)
    out = sys.stdout.buffer

    def write(data: bytes) -> None:
        out.write(data if raw else sanitize(data))
        out.flush()

    with CriClient(cfg.socket_path) as cri:
        pod = cri.pod(target)
        path = console_path(pod)
        follower = Follower(path)
        try:
            try:
                write(tail_lines(follower.open_at_tail(TAIL_BYTES), lines))
            except FileNotFoundError:
                raise NotFound(f"console log {path} does not exist") from None
            if no_follow:
                return 0

            def still_running() -> bool:
                try:
                    return cri.pod(pod.id).state == "ready"
                except NotFound:
                    return False

            follow(follower, write, still_running)
        finally:
            follower.close()
    return 0
