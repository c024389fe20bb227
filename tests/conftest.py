"""Shared pytest setup: fixtures from tests/support, leak checks after every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.leaks import Snapshot, check_no_leaks

pytest_plugins = ["tests.support.daemon"]


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a process, netns, mount or link behind.

    Unit tests are exempt: they start nothing.
    """
    if "tests/unit" in str(request.node.path):
        yield
        return
    before = Snapshot.take()
    yield
    leaks = check_no_leaks(before)
    assert not leaks, "leaked after test:\n  " + "\n  ".join(leaks)
