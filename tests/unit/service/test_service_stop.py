"""`criv stop` and the --daemon pid file, without starting criv: stale pid files never
get a process killed, a held pid file refuses a second daemon before anything forks."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest

from criv import service
from criv.errors import FailedPrecondition


def test_no_pid_file_is_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert service.stop(tmp_path / "criv.pid") == 0
    assert "not running" in capsys.readouterr().out


def test_stale_pid_file_never_signals_another_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a live process that is no `criv serve` (its pid may be what a stale file names)
    other = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = tmp_path / "criv.pid"
        pid_file.write_text(f"{other.pid}\n")
        assert service.running_pid(pid_file) is None
        assert service.stop(pid_file, timeout=1) == 0
        assert "stale pid file" in capsys.readouterr().out
        assert other.poll() is None, "stop signalled a process that is not criv"
    finally:
        other.kill()
        other.wait()


def test_pid_of_a_dead_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    pid_file = tmp_path / "criv.pid"
    pid_file.write_text(f"{p.pid}\n")
    assert service.stop(pid_file) == 0
    assert "not running" in capsys.readouterr().out


def test_a_held_pid_file_refuses_a_second_daemon_before_forking(tmp_path: Path) -> None:
    pid_file = tmp_path / "criv.pid"
    pid_file.write_text("4242\n")
    with pid_file.open("r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FailedPrecondition, match=r"already running \(pid 4242\)"):
            service.daemonize(pid_file, tmp_path / "criv.log")
    assert pid_file.read_text() == "4242\n"  # the running daemon's pid file is untouched
    assert not (tmp_path / "criv.log").exists()


def test_default_pid_file_is_in_the_run_dir() -> None:
    from criv.config import parse_config

    cfg = parse_config("run_dir: /run/other\n")
    assert service.default_pid_file(cfg) == Path("/run/other/criv.pid")
    assert os.path.isabs(service.DEFAULT_LOG_FILE)


def test_ready_survives_a_starting_command_that_went_away() -> None:
    r, w = os.pipe()
    os.close(r)  # e.g. Ctrl-C on `criv serve --daemon` while criv was still starting
    d = service.Detached(None, w)
    d.ready()  # no BrokenPipeError: the daemon goes on serving
    d.ready()  # and only once
