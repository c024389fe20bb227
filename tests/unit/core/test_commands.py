"""criv/commands.py: a host command past its deadline, or whose caller is cancelled, is
killed with its whole process group and reaped; the error names it."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from criv import commands
from criv.commands import configure_timeouts, run_command, run_sync, timeout_for
from criv.errors import CommandTimeout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead but not reaped; reaped is what we want for our child only
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


async def _wait_gone(pid: int) -> bool:
    for _ in range(200):
        if not _alive(pid):
            return True
        await asyncio.sleep(0.05)
    return False


def _script(tmp_path: Path, pidfile: Path) -> str:
    """A shell that starts a grandchild (in its group), records its pid, then hangs."""
    s = tmp_path / "hang.sh"
    s.write_text(f"#!/bin/sh\nsleep 600 &\necho $! > {pidfile}\nwait\n")
    s.chmod(0o755)
    return str(s)


async def test_output_and_exit_code() -> None:
    assert await run_command("sh", "-c", "echo hi; echo err >&2; exit 3") == (3, "hi\nerr")
    rc, out = await run_command("sh", "-c", "echo hi; echo err >&2", merge_stderr=False)
    assert (rc, out) == (0, "hi")


async def test_stdin_is_fed_or_empty() -> None:
    assert await run_command("sh", "-c", "tr a-z A-Z", stdin=b"tc -batch\n") == (0, "TC -BATCH")
    assert await run_command("cat") == (0, "")  # /dev/null: never waits for input


async def test_deadline_kills_the_group_and_names_the_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(CommandTimeout) as e:
        await run_command(_script(tmp_path, pidfile), "--flag", timeout=0.5)
    assert e.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "hang.sh" in e.value.message and "--flag" in e.value.message
    assert "0.5s" in e.value.message
    assert await _wait_gone(int(pidfile.read_text()))  # the grandchild went too


async def test_cancelled_caller_leaves_nothing_running(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    task = asyncio.create_task(run_command(_script(tmp_path, pidfile), timeout=600))
    while not pidfile.exists() or not pidfile.read_text().strip():
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _wait_gone(int(pidfile.read_text()))


def test_timeouts_by_program_name_and_config() -> None:
    try:
        assert timeout_for("/usr/bin/umount") == commands.DEFAULT_TIMEOUTS["umount"]
        assert timeout_for("no-such-tool") == commands.DEFAULT_TIMEOUTS["default"]
        configure_timeouts({"umount": 5, "default": 7})
        assert timeout_for("umount") == 5
        assert timeout_for("/opt/x/other") == 7
        assert timeout_for("mount") == commands.DEFAULT_TIMEOUTS["mount"]
    finally:
        configure_timeouts({})
    assert timeout_for("umount") == commands.DEFAULT_TIMEOUTS["umount"]


async def test_config_deadline_applies_without_a_caller_timeout(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    configure_timeouts({"hang.sh": 1})
    try:
        with pytest.raises(CommandTimeout, match="1s"):
            await run_command(_script(tmp_path, pidfile))
    finally:
        configure_timeouts({})
    assert await _wait_gone(int(pidfile.read_text()))


def test_run_sync_deadline_kills_the_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(CommandTimeout, match=r"hang\.sh"):
        run_sync([_script(tmp_path, pidfile)], timeout=0.5)
    assert asyncio.run(_wait_gone(int(pidfile.read_text())))
    assert run_sync(["sh", "-c", "echo out; echo err >&2"]).stdout == "out\n"
    with pytest.raises(subprocess.CalledProcessError):
        run_sync(["false"], check=True)
