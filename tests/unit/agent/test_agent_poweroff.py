"""When the agent powers the VM off itself: only with --power-off-on-shutdown, and only
after ShutdownSandbox (not after a signal); how it ends the VM. reboot(2) is replaced by a
recorder here."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from criv_agent import main as agent_main
from criv_agent import poweroff

BASE = ["--control", "unix:/c", "--data", "unix:/d", "--state-dir", "/s"]


@pytest.mark.parametrize(
    ("flag", "shut_down", "powered_off"),
    [(True, True, True), (True, False, False), (False, True, False), (False, False, False)],
)
def test_power_off_only_after_shutdown_sandbox_and_with_the_flag(
    monkeypatch: pytest.MonkeyPatch, flag: bool, shut_down: bool, powered_off: bool
) -> None:
    calls: list[str] = []

    async def serve(args: argparse.Namespace) -> bool:
        return shut_down

    def power_off() -> OSError:
        calls.append("power_off")
        return OSError(1, "reboot(2)")  # as reboot(2) failing: main goes on to exit

    monkeypatch.setattr(agent_main, "serve", serve)
    monkeypatch.setattr(agent_main, "set_subreaper", lambda: None)
    monkeypatch.setattr(poweroff, "power_off", power_off)
    agent_main.main(BASE + (["--power-off-on-shutdown"] if flag else []))
    assert calls == (["power_off"] if powered_off else [])


def test_power_off_syncs_then_restarts_through_sysrq_then_falls_back_to_reboot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """sysrq's emergency restart first (no driver's shutdown: a clone's pmem flush would
    never be answered); reboot(2) only where that returned (here: a plain file)."""
    calls: list[str] = []

    class Libc:
        def reboot(self, how: int) -> int:
            written = trigger.read_text() if trigger.is_file() else None
            calls.append(f"reboot {how:#x} after sysrq {written!r}")
            return -1

    monkeypatch.setattr(poweroff.os, "sync", lambda: calls.append("sync"))
    monkeypatch.setattr(poweroff.ctypes, "CDLL", lambda *a, **kw: Libc())
    trigger = tmp_path / "sysrq-trigger"
    trigger.write_text("")
    assert isinstance(poweroff.power_off(str(trigger)), OSError)
    assert calls[0] == "sync" and calls[1].endswith("after sysrq 'b'"), calls
    # no sysrq in the kernel: straight to reboot(2)
    calls.clear()
    trigger.unlink()
    trigger.mkdir()  # opening it for writing fails
    assert isinstance(poweroff.power_off(str(trigger)), OSError)
    assert calls[0] == "sync" and calls[1].startswith("reboot"), calls
