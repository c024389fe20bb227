"""Launch and supervise one vsock backend process per VM (used by criv's VM driver)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from criv.vsock.connector import HybridVsockConnector
from criv.vsock.logcap import DEFAULT_LOG_MAX_BYTES

_PKG_ROOT = str(Path(__file__).resolve().parents[2])


class BackendError(RuntimeError):
    """The backend did not start (its stderr tail is in the message)."""


class VsockBackendProcess:
    def __init__(
        self,
        socket_path: str,
        uds_path: str,
        guest_cid: int,
        *,
        listen_ports: list[int] | None = None,
        status_file: str | None = None,
        log_path: str | None = None,
        log_level: str = "INFO",
        log_max_bytes: int = DEFAULT_LOG_MAX_BYTES,
    ) -> None:
        self.socket_path = socket_path
        self.uds_path = uds_path
        self.guest_cid = guest_cid
        self.listen_ports = list(listen_ports or [])
        self.status_file = status_file
        self.log_path = log_path
        self.log_level = log_level
        self.log_max_bytes = log_max_bytes  # the backend keeps its log file under this
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-S",  # no site: the backend needs only the stdlib and criv (PYTHONPATH)
            "-m",
            "criv.vsock",
            "--socket",
            self.socket_path,
            "--uds",
            self.uds_path,
            "--guest-cid",
            str(self.guest_cid),
            "--log-level",
            self.log_level,
            "--log-max-bytes",
            str(self.log_max_bytes),
        ]
        for p in self.listen_ports:
            argv += ["--listen-port", str(p)]
        if self.status_file:
            argv += ["--status-file", self.status_file]
        return argv

    def environment(self) -> dict[str, str]:
        """The backend's environment: criv comes from ``PYTHONPATH`` (it runs without site)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PKG_ROOT, env.get("PYTHONPATH")]))
        return env

    def start(self) -> VsockBackendProcess:
        env = self.environment()
        self._log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log if self._log else subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise BackendError(f"vsock backend not ready after {timeout}s")
            r, _, _ = select.select([proc.stdout], [], [], left)
            if r:
                b = os.read(proc.stdout.fileno(), 256)
                if not b:
                    break
                line += b
        if b"ready" not in line:
            proc.wait(timeout=5)
            raise BackendError(f"vsock backend exited ({proc.returncode}): {self._stderr_tail()}")

    def _stderr_tail(self) -> str:
        if self.log_path:
            try:
                return Path(self.log_path).read_text(errors="replace")[-2000:]
            except OSError:
                return ""
        if self.proc is not None and self.proc.stderr is not None:
            return self.proc.stderr.read().decode(errors="replace")[-2000:]
        return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int | None:
        if not self.alive():
            return None
        try:
            pages = int(Path(f"/proc/{self.pid}/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024

    def connector(self) -> HybridVsockConnector:
        return HybridVsockConnector(self.uds_path)

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 5.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in (proc.stdout, proc.stderr, self._log):
            if f is not None:
                f.close()
        self._log = None
        return proc.returncode
