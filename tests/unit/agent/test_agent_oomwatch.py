"""The agent's OOM watch (criv_agent/oomwatch.py) on real files: a write to a watched file
reaches its container's callback through inotify; unwatched and removed files do not."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from criv_agent import oomwatch
from criv_agent.oomwatch import OomWatch


async def _settled(seen: list[str], within: float, then: float) -> None:
    """Wait for a first callback (at most ``within`` s), then ``then`` s for any more."""
    for _ in range(int(within / 0.01)):
        if seen:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(then)


async def _changes(watch_files: dict[str, Path], write: list[Path]) -> list[str]:
    seen: list[str] = []
    got = asyncio.Event()

    def changed(cid: str) -> None:
        seen.append(cid)
        got.set()

    w = OomWatch(changed)
    assert w.available
    try:
        for cid, f in watch_files.items():
            assert w.watch(cid, str(f))
        for f in write:
            f.write_text("oom_kill 1\n")
        await asyncio.wait_for(got.wait(), 10)
        await asyncio.sleep(0.05)  # any further events
    finally:
        w.close()
    return seen


def test_a_change_to_a_watched_file_names_its_container(tmp_path: Path) -> None:
    a, b = tmp_path / "a.events", tmp_path / "b.events"
    for f in (a, b):
        f.write_text("oom_kill 0\n")
    assert asyncio.run(_changes({"ca": a, "cb": b}, [b])) == ["cb"]


def test_an_unwatched_container_is_not_reported(tmp_path: Path) -> None:
    a, b = tmp_path / "a.events", tmp_path / "b.events"
    for f in (a, b):
        f.write_text("oom_kill 0\n")

    async def run() -> list[str]:
        seen: list[str] = []
        w = OomWatch(seen.append)
        try:
            assert w.watch("ca", str(a)) and w.watch("cb", str(b))
            w.unwatch("ca")
            assert not w.watching("ca") and w.watching("cb")
            a.write_text("oom_kill 1\n")
            b.write_text("oom_kill 1\n")
            await _settled(seen, within=2.0, then=0.05)
        finally:
            w.close()
        return seen

    assert asyncio.run(run()) == ["cb"]


def test_a_removed_file_drops_its_watch_and_a_missing_one_cannot_be_watched(
    tmp_path: Path,
) -> None:
    f = tmp_path / "memory.events"
    f.write_text("oom_kill 0\n")

    async def run() -> tuple[bool, bool]:
        w = OomWatch(lambda cid: None)
        try:
            assert w.watch("c", str(f))
            f.unlink()  # as when the container's cgroup goes: IN_IGNORED
            for _ in range(200):
                if not w.watching("c"):
                    break
                await asyncio.sleep(0.01)
            return w.watching("c"), w.watch("d", str(tmp_path / "absent"))
        finally:
            w.close()

    assert asyncio.run(run()) == (False, False)


def test_a_burst_of_changes_gives_one_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a container pressing on its limit moves memory.events again and again; each change
    # is read by the loop before the next (inotify would merge unread identical events)
    monkeypatch.setattr(oomwatch, "SETTLE", 1.0)
    f = tmp_path / "memory.events"
    f.write_text("max 0\n")

    async def run() -> list[str]:
        seen: list[str] = []
        w = OomWatch(seen.append)
        try:
            assert w.watch("c", str(f))
            for i in range(10):
                f.write_text(f"max {i + 1}\n")
                await asyncio.sleep(0.005)
            await _settled(seen, within=5.0, then=0.1)
        finally:
            w.close()
        return seen

    assert asyncio.run(run()) == ["c"]
