"""criv as a service without systemd: `criv serve --daemon`, `criv stop`, and a restart
in between that re-adopts a running host-mode pod."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from criv import service
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import (  # noqa: F401  (fixtures)
    Cri,
    cni_overrides,
    config_for,
    no_cgroup_leaks,
    registry,
)
from tests.support.daemon import CRIV, CrivProcess, default_config, merge
from tests.support.fixtures import TestRegistry

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


class DaemonCriv(CrivProcess):
    """A CrivProcess started with `criv serve --daemon` and stopped with `criv stop`."""

    env: dict[str, str]

    @property
    def pid_file(self) -> Path:
        return self.root / "criv.pid"

    def _cmd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CRIV), *args, "--config", str(self.config_path), "--pid-file", str(self.pid_file)],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
        )

    def start(self, timeout: float = 30.0) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))
        r = self._cmd("serve", "--daemon", "--log-file", str(self.log_path))
        assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{self.logs()}"
        # it returns only once the socket is served: no waiting here
        assert self.socket.exists()
        self._channel = grpc.insecure_channel(f"unix:{self.socket}")
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def stop(self, timeout: float = 60.0) -> int:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        r = self._cmd("stop")
        assert "stopped" in r.stdout or "not running" in r.stdout, r.stdout + r.stderr
        return r.returncode

    def pid(self) -> int:
        return int(self.pid_file.read_text())


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(10)
    yield s, str(path)
    s.close()


@pytest.fixture
def daemon_cri(
    registry: TestRegistry,  # noqa: F811
    cni_overrides: dict[str, Any],  # noqa: F811
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
) -> Iterator[Cri]:
    root = tmp_path / "criv"
    root.mkdir()
    proc = DaemonCriv(root, merge(default_config(root), config_for(registry, cni_overrides)))
    proc.env = {**os.environ, "NOTIFY_SOCKET": notify_socket[1]}
    c = Cri(proc, registry.busybox_ref, tmp_path / "logs")
    c._pods = {}
    try:
        yield c
    finally:
        try:
            if c._pods:
                # a test that failed while criv was stopped: bring it back to remove them
                if service.running_pid(proc.pid_file) is None:
                    proc.start()
                elif proc._channel is None:
                    proc._channel = grpc.insecure_channel(f"unix:{proc.socket}")
                c.teardown()
        finally:
            proc.stop()


def _alive(pid: int) -> bool:
    """Running, not a zombie: the daemon is no child of ours, and some init reaps late."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_daemon_start_restart_readopts_pod_and_stops(
    daemon_cri: Cri, notify_socket: tuple[socket.socket, str]
) -> None:
    cri = daemon_cri
    proc = cri.proc
    assert isinstance(proc, DaemonCriv)
    proc.start()
    first = proc.pid()
    # detached: not our child, in a session of its own
    ppid = int(Path(f"/proc/{first}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid != os.getpid()
    assert os.getsid(first) != os.getsid(0)
    # with NOTIFY_SOCKET set (as systemd sets it), READY=1 comes once the socket is served
    msg = notify_socket[0].recv(4096).decode()
    assert msg.splitlines()[0] == "READY=1"
    assert f"unix://{proc.socket}" in msg
    v = proc.runtime.Version(api_pb2.VersionRequest(), timeout=10)
    assert v.runtime_name == "criv"

    # pre-pull through the CLI: it goes through the daemon's socket
    r = subprocess.run(
        [str(CRIV), "image", "pull", cri.image, "--config", str(proc.config_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1].startswith(f"pulled {cri.image} in ")
    listed = proc.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images
    assert any(cri.image in i.repo_tags for i in listed)
    pod = cri.run_pod("svc")
    ctr = cri.run(pod, "sleeper", ["sleep", "1000"])

    assert proc.stop() == 0
    assert not _alive(first)
    assert not proc.pid_file.exists(), "the daemon removes its pid file at exit"
    assert not proc.socket.exists()
    assert notify_socket[0].recv(4096).decode() == "STOPPING=1"

    proc.start()
    assert proc.pid() != first
    assert notify_socket[0].recv(4096).decode().startswith("READY=1")
    assert cri.pod_status(pod).state == api_pb2.SANDBOX_READY
    assert cri.status(ctr).state == api_pb2.CONTAINER_RUNNING
    assert cri.exec(ctr, ["echo", "still here"]).stdout == b"still here\n"

    cri.teardown()
    cri._pods.clear()
    # the documented stop without the CLI: SIGTERM to the pid in the pid file
    second = proc.pid()
    if proc._channel is not None:
        proc._channel.close()
        proc._channel = None
    os.kill(second, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _alive(second):
        assert time.monotonic() < deadline, f"criv ignored SIGTERM:\n{proc.logs()}"
        time.sleep(0.1)
    assert not proc.pid_file.exists()
    assert "criv stopped" in proc.logs()


def test_daemon_refuses_a_second_start_and_reports_a_failed_one(
    daemon_cri: Cri, tmp_path: Path
) -> None:
    proc = daemon_cri.proc
    assert isinstance(proc, DaemonCriv)
    proc.start()
    r = proc._cmd("serve", "--daemon", "--log-file", str(proc.log_path))
    assert r.returncode == 1
    assert f"already running (pid {proc.pid()})" in r.stderr
    assert proc.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "criv"

    # a daemon that dies before serving (its state dir is taken) fails the start command,
    # which shows the end of the log
    other = tmp_path / "other"
    other.mkdir()
    cfg = merge(proc.config, {"socket": str(other / "criv.sock")})
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [str(CRIV), "serve", "--daemon", "--config", str(other / "config.yaml"),
         "--pid-file", str(other / "criv.pid"), "--log-file", str(other / "criv.log")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    assert "exited before serving" in r.stdout
    assert "another criv is already running on this state dir" in r.stdout
    assert not (other / "criv.pid").exists()
