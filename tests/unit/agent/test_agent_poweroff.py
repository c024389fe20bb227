"""When the agent powers the VM off itself: only with --power-off-on-shutdown, and only
after ShutdownSandbox (not after a signal). reboot(2) is replaced by a recorder here."""

from __future__ import annotations

import argparse

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
