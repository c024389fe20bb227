"""The backend's log stays bounded however much the guest makes it say."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from criv.vsock.logcap import CappedStreamHandler, RateLimited
from criv.vsock.process import VsockBackendProcess


def test_log_file_is_capped_and_keeps_the_latest_lines(tmp_path: Path) -> None:
    path = tmp_path / "backend.log"
    with path.open("ab") as raw, open(raw.fileno(), "w", closefd=False) as stream:
        handler = CappedStreamHandler(stream, max_bytes=4096)
        log = logging.getLogger("test.logcap")
        log.propagate = False
        log.addHandler(handler)
        try:
            for i in range(2000):
                log.warning("line %05d %s", i, "x" * 40)
                assert path.stat().st_size <= 4096 + 100
        finally:
            log.removeHandler(handler)
    text = path.read_text()
    assert text.startswith("criv-vsock: log over 4096 bytes, older lines dropped\n")
    assert text.endswith(f"line 01999 {'x' * 40}\n")
    assert "line 00000" not in text
    assert all(line.startswith(("line ", "criv-vsock:")) for line in text.splitlines())


def test_backend_main_logs_through_the_cap(tmp_path: Path) -> None:
    """``python -m criv.vsock`` writes its log through the capped handler: a log file already
    past --log-max-bytes is cut on the next line it logs (here: refusing a bad CID)."""
    log = tmp_path / "vsock.log"
    log.write_text("old line\n" * 1000)
    argv = ["--socket", "v", "--uds", "u", "--guest-cid", "2", "--log-max-bytes", "2000"]
    with log.open("ab") as f:
        r = subprocess.run([sys.executable, "-m", "criv.vsock", *argv], stderr=f, timeout=60)
    assert r.returncode == 2
    text = log.read_text()
    assert len(text) <= 2000 and text.startswith("criv-vsock: log over 2000 bytes")
    assert text.endswith("guest CID must be >= 3\n")


def test_backend_process_passes_the_cap(tmp_path: Path) -> None:
    p = VsockBackendProcess("v.sock", "u.sock", 3, log_path=str(tmp_path / "l"))
    argv = p.argv()
    assert argv[argv.index("--log-max-bytes") + 1] == str(4 << 20)
    p = VsockBackendProcess("v.sock", "u.sock", 3, log_max_bytes=1000)
    assert "1000" in p.argv()


def test_rate_limited_warnings(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    rl = RateLimited(logging.getLogger("test.rl"), interval=10, burst=2, clock=lambda: now[0])
    for i in range(5):
        rl.warning("bad", "bad packet %d", i)
    rl.warning("other", "other thing")
    assert [r.getMessage() for r in caplog.records] == [
        "bad packet 0",
        "bad packet 1",
        "other thing",
    ]
    now[0] = 11
    rl.warning("bad", "bad packet %d", 5)
    assert [r.getMessage() for r in caplog.records][-2:] == [
        "3 more 'bad' warnings were not logged",
        "bad packet 5",
    ]
