"""The guest-image build's progress display: phases, timings kept, estimates from them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from criv.progress import TIMINGS_FILE, BuildProgress, fmt_duration, load_timings


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _plain() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=200), buf


FULL_BUILD = [
    ("kernel: extracting linux-source", 5),
    ("kernel: make -j2 vmlinux", 600),
    ("kernel: done, 9 MiB vmlinux", 0),
    ("rootfs: debootstrap bookworm", 100),
    ("rootfs: base build time: 100.0 s", 0),
    ("image: copying base, adding agent, init, bytecode", 20),
    ("initramfs: 4000 entries, 69 MiB", 10),
    ("image: ready /cache/image-x", 0),
]


def _run(bp: BuildProgress, clock: Clock, lines: list[tuple[str, int]]) -> None:
    with bp:
        for line, took in lines:
            bp(line)
            clock.t += took


def test_first_build_has_no_estimate_and_saves_per_phase_timings(tmp_path: Path) -> None:
    clock = Clock()
    console, buf = _plain()
    bp = BuildProgress(tmp_path, console=console, clock=clock)
    with bp:
        bp("kernel: extracting linux-source")
        assert bp.remaining() is None
        clock.t += 5
        for line, took in FULL_BUILD[1:]:
            bp(line)
            clock.t += took
    assert load_timings(tmp_path) == {"kernel": 605.0, "rootfs": 100.0, "image": 30.0}
    out = buf.getvalue()
    assert "-- kernel: no timing yet; no estimate" in out
    assert "[10m05s] rootfs: debootstrap bookworm" in out  # elapsed before each line
    assert "guest image: done in 12m15s" in out


def test_next_build_estimates_what_is_left(tmp_path: Path) -> None:
    (tmp_path / TIMINGS_FILE).write_text(
        json.dumps({"version": 1, "phases": {"kernel": 600, "rootfs": 100, "image": 30}})
    )
    clock = Clock()
    console, buf = _plain()
    bp = BuildProgress(tmp_path, {"rootfs": True}, console=console, clock=clock)
    with bp:
        bp("kernel: extracting linux-source")
        assert bp.remaining() == 730
        clock.t += 200
        assert bp.remaining() == 530  # the kernel's 600 s minus 200 s spent
        assert bp.fraction() == 200 / 730
        clock.t += 500  # slower than last time: the kernel counts as nothing left
        assert bp.remaining() == 130
        bp("rootfs: debootstrap bookworm")
        assert bp.remaining() == 130
        clock.t += 100
        bp("image: copying base")
        clock.t += 30
    assert "-- kernel: last build took 10m00s; about 12m10s left in all" in buf.getvalue()
    assert load_timings(tmp_path) == {"kernel": 700.0, "rootfs": 100.0, "image": 30.0}


def test_cached_phases_cost_nothing_and_keep_the_old_timings(tmp_path: Path) -> None:
    (tmp_path / TIMINGS_FILE).write_text(
        json.dumps({"version": 1, "phases": {"kernel": 600, "rootfs": 100, "image": 30}})
    )
    clock = Clock()
    console, buf = _plain()
    # the planner saw the kernel and the base rootfs cached: only the image assembles
    bp = BuildProgress(tmp_path, {"kernel": False, "rootfs": False}, console=console, clock=clock)
    with bp:
        assert bp.remaining() == 30
        bp("kernel: cached /cache/kernel-x")
        clock.t += 1
        bp("rootfs: cached base /cache/base-y")
        bp("image: copying base")
        clock.t += 45
    assert load_timings(tmp_path) == {"kernel": 600.0, "rootfs": 100.0, "image": 45.0}
    assert "-- kernel" not in buf.getvalue()  # a phase expected cached has no estimate line


def test_everything_cached_writes_no_timings(tmp_path: Path) -> None:
    clock = Clock()
    console, _ = _plain()
    _run(
        BuildProgress(tmp_path, console=console, clock=clock),
        clock,
        [("kernel: cached /k", 0), ("image: cached /i", 0)],
    )
    assert not (tmp_path / TIMINGS_FILE).exists()


def test_unreadable_timings_mean_no_estimate(tmp_path: Path) -> None:
    (tmp_path / TIMINGS_FILE).write_text("{not json")
    assert load_timings(tmp_path) == {}
    (tmp_path / TIMINGS_FILE).write_text(json.dumps({"version": 99, "phases": {"kernel": 1}}))
    assert load_timings(tmp_path) == {}
    (tmp_path / TIMINGS_FILE).write_text(
        json.dumps({"version": 1, "phases": {"kernel": -5, "bogus": 3, "image": "x"}})
    )
    assert load_timings(tmp_path) == {}


def test_terminal_gets_the_live_display_and_the_builder_lines(tmp_path: Path) -> None:
    clock = Clock()
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    bp = BuildProgress(tmp_path, console=console, clock=clock)
    assert bp.tty
    _run(bp, clock, FULL_BUILD)
    out = buf.getvalue()
    assert "kernel: make -j2 vmlinux" in out
    assert "guest image: kernel" in out  # the live line's phase column
    assert "[  " not in out  # no plain-mode stamps on a terminal


def test_fmt_duration() -> None:
    assert fmt_duration(4.4) == "4s"
    assert fmt_duration(65) == "1m05s"
    assert fmt_duration(3 * 3600 + 120) == "3h02m"


def test_plain_lines_are_not_wrapped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logs keep each builder line whole, whatever width rich assumes off a TTY."""
    monkeypatch.setenv("COLUMNS", "40")
    long = "rootfs: debootstrap bookworm minbase from http://deb.debian.org/debian (+python3)"
    with BuildProgress(tmp_path, clock=Clock()) as bp:  # the default console: stdout
        bp(long)
    assert f"] {long}\n" in capsys.readouterr().out
