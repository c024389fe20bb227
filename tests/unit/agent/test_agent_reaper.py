"""The reaper finds the agent's children without /proc/<pid>/task/<tid>/children
(CONFIG_PROC_CHILDREN, which criv's guest kernel lacks) and reaps only foreign-namespace
zombies."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from criv_agent import reaper


def test_children_by_scan_matches_the_kernel_list() -> None:
    kids = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
    try:
        found = reaper._children_by_scan(os.getpid())
        assert {k.pid for k in kids} <= found
        if os.path.exists(f"/proc/self/task/{os.getpid()}/children"):
            assert found == reaper._children()
    finally:
        for k in kids:
            k.kill()
            k.wait()


def test_without_the_children_file_the_scan_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if p.endswith("/children") else real(p))
    kid = subprocess.Popen(["sleep", "30"])
    try:
        assert kid.pid in reaper._children()
    finally:
        kid.kill()
        kid.wait()


def test_own_namespace_zombies_are_left_to_their_waiter() -> None:
    kid = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while not reaper._is_zombie(kid.pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert reaper.Reaper(set).reap() == []
    assert kid.wait(5) == 0  # still ours to reap
