"""The backend process and its launcher, with a fake QEMU (no VM needed)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from criv.vsock import protocol as V
from criv.vsock.connector import VsockBackendUnavailable, VsockConnectionRefused, hybrid_connect
from criv.vsock.process import BackendError, VsockBackendProcess


@pytest.mark.timeout(30)
def test_start_ready_status_and_exit_on_qemu_disconnect(tmp_path: Path) -> None:
    p = VsockBackendProcess(
        str(tmp_path / "vhost.sock"),
        str(tmp_path / "v.sock"),
        3,
        listen_ports=[1000],
        status_file=str(tmp_path / "status.json"),
        log_path=str(tmp_path / "backend.log"),
    ).start()
    try:
        p.wait_ready()
        status = json.loads((tmp_path / "status.json").read_text())
        assert status["pid"] == p.pid and status["rss_kib"] > 0
        assert os.path.exists(tmp_path / "v.sock.1000")
        # no guest yet: a hybrid connect is refused, not hung
        with pytest.raises(VsockConnectionRefused):
            hybrid_connect(str(tmp_path / "v.sock"), 1000, timeout=5)
        q = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        q.connect(str(tmp_path / "vhost.sock"))
        q.sendall(V.HEADER.pack(V.Request.GET_FEATURES, V.VERSION, 0))
        _req, _flags, size = V.HEADER.unpack(q.recv(12))
        assert size == 8
        q.recv(8)
        q.close()  # "QEMU" goes away: the backend exits by itself
        assert p.wait(10) == 0
        assert not os.path.exists(tmp_path / "v.sock")
        assert "exiting (qemu disconnected)" in (tmp_path / "backend.log").read_text()
        with pytest.raises(VsockBackendUnavailable):
            hybrid_connect(str(tmp_path / "v.sock"), 1000, timeout=5)
    finally:
        p.stop()


@pytest.mark.timeout(30)
def test_stop_with_sigterm(tmp_path: Path) -> None:
    p = VsockBackendProcess(str(tmp_path / "vhost.sock"), str(tmp_path / "v.sock"), 3).start()
    p.wait_ready()
    rss = p.rss_kib()
    assert rss is not None and rss < 64 * 1024
    assert p.stop() == 0
    assert not p.alive()


@pytest.mark.timeout(30)
def test_bad_arguments_fail_wait_ready(tmp_path: Path) -> None:
    p = VsockBackendProcess(str(tmp_path / "vhost.sock"), str(tmp_path / "v.sock"), 1).start()
    with pytest.raises(BackendError, match="CID"):
        p.wait_ready()
    p.stop()
