"""criv/failpoints.py: the variable's grammar, each action, and that the points listed
are exactly the ones placed in the code."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from criv import failpoints
from criv.errors import Internal

CRIV = Path(__file__).resolve().parents[3] / "criv"


def test_every_listed_point_is_placed_once_and_no_other() -> None:
    placed: list[str] = []
    for f in CRIV.rglob("*.py"):
        placed += re.findall(r'failpoints\.hit\("([^"]+)"\)', f.read_text())
    assert sorted(placed) == sorted(failpoints.POINTS)


def test_parse_accepts_points_and_actions_and_refuses_typos() -> None:
    assert failpoints.parse("") == {}
    assert failpoints.parse(" run_pod.after_boot=kill , stop_pod.after_agent=error-once,") == {
        "run_pod.after_boot": "kill",
        "stop_pod.after_agent": "error-once",
    }
    for bad in ("run_pod.after_boot", "run_pod.after_bot=kill", "run_pod.after_boot=crash"):
        with pytest.raises(ValueError, match="CRIV_FAILPOINTS"):
            failpoints.parse(bad)


def test_error_and_error_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        failpoints, "_armed", {"run_pod.after_boot": "error", "run_pod.after_setup": "error-once"}
    )
    failpoints.hit("run_pod.after_connect")  # not armed: nothing
    for _ in range(2):
        with pytest.raises(Internal, match=r"failpoint run_pod\.after_boot"):
            failpoints.hit("run_pod.after_boot")
    with pytest.raises(Internal):
        failpoints.hit("run_pod.after_setup")
    failpoints.hit("run_pod.after_setup")  # once only


def test_kill_is_a_sigkill_of_the_process_itself() -> None:
    code = "from criv import failpoints; failpoints.hit('remove_pod.after_stop'); print('alive')"
    r = subprocess.run(
        [sys.executable, "-c", code],
        env={"CRIV_FAILPOINTS": "remove_pod.after_stop=kill", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == -signal.SIGKILL and b"alive" not in r.stdout


def test_a_typo_in_the_variable_stops_the_process() -> None:
    r = subprocess.run(
        [sys.executable, "-c", "import criv.failpoints"],
        env={"CRIV_FAILPOINTS": "run_pod.afterboot=kill", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
    )
    assert r.returncode != 0 and b"run_pod.afterboot" in r.stderr


def test_every_point_is_in_the_operations_guide() -> None:
    doc = (CRIV.parent / "docs" / "operations.md").read_text()
    missing = [p for p in failpoints.POINTS if f"| `{p}` |" not in doc]
    assert not missing, f"docs/operations.md (Failpoints) lacks {missing}"
