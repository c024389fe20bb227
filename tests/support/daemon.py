"""Start a real `criv serve` process for tests and talk to it through its socket."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc

CRIV = Path(sys.executable).parent / "criv"


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


@dataclass
class CrivProcess:
    root: Path
    config: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    _channel: grpc.Channel | None = None

    def __post_init__(self) -> None:
        self.log_path = self.root / "criv.log"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def socket(self) -> Path:
        return Path(self.config["socket"])

    @property
    def state_dir(self) -> Path:
        return Path(self.config["state_dir"])

    def start(self, timeout: float = 30.0) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(CRIV), "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"criv exited with {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"criv did not create its socket:\n{self.logs()}")
            time.sleep(0.05)
        self._channel = grpc.insecure_channel(f"unix:{self.socket}")
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    @property
    def runtime(self) -> api_pb2_grpc.RuntimeServiceStub:
        assert self._channel is not None
        return api_pb2_grpc.RuntimeServiceStub(self._channel)

    @property
    def images(self) -> api_pb2_grpc.ImageServiceStub:
        assert self._channel is not None
        return api_pb2_grpc.ImageServiceStub(self._channel)

    def stop(self, timeout: float = 60.0) -> int:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise RuntimeError(f"criv did not stop on SIGTERM:\n{self.logs()}") from None

    def restart(self) -> None:
        rc = self.stop()
        assert rc == 0, self.logs()
        self.start()


def default_config(root: Path) -> dict[str, Any]:
    return {
        "socket": str(root / "run" / "criv.sock"),
        "state_dir": str(root / "state"),
        "run_dir": str(root / "run"),
        "log": {"level": "debug", "format": "text"},
    }


@pytest.fixture
def criv_factory(tmp_path: Path) -> Iterator[Any]:
    """criv_factory(config_overrides) -> a started CrivProcess; all stopped at teardown."""
    started: list[CrivProcess] = []

    outside: list[Path] = []  # run and state dirs

    def make(overrides: dict[str, Any] | None = None, start: bool = True) -> CrivProcess:
        root = tmp_path / f"criv{len(started)}"
        root.mkdir()
        run_dir, state_dir = _outside_pytest(RUN_ROOT), _outside_pytest(STATE_ROOT)
        outside.extend((run_dir, state_dir))
        base = {**default_config(root), "run_dir": str(run_dir), "state_dir": str(state_dir)}
        cp = CrivProcess(root, merge(base, overrides or {}))
        started.append(cp)
        if start:
            cp.start()
        return cp

    yield make
    errors = []
    for cp in started:
        rc = cp.stop()
        if rc not in (0, None):
            errors.append(f"criv exited {rc}:\n{cp.logs()}")
    for d in outside:
        if not _mounts_under(
            d
        ):  # a leaked mount is the leak check's to report, not ours to delete through
            shutil.rmtree(d, ignore_errors=True)
    assert not errors, "\n".join(errors)


# A daemon's run dir (agent and VM sockets) and state dir (pod files QEMU opens, rootfs
# paths crun resolves as a user namespace's root) live outside pytest's temp tree:
# unprivileged QEMU and mapped roots must traverse to them, and every new pytest session
# resets /tmp/pytest-of-<user> to 0700 (a unit run beside a VM run would cut them off).
RUN_ROOT = Path("/run/criv-test")
STATE_ROOT = Path("/var/tmp/criv-test")


def _outside_pytest(parent: Path) -> Path:
    parent.mkdir(mode=0o711, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="c", dir=parent))
    d.chmod(0o711)
    return d


def _mounts_under(d: Path) -> bool:
    prefix = f"{d}/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4].startswith(prefix) for line in f)


@pytest.fixture
def criv(criv_factory: Any) -> CrivProcess:
    proc: CrivProcess = criv_factory()
    return proc


__all__ = ["CrivProcess", "api_pb2", "criv", "criv_factory", "default_config", "merge"]
