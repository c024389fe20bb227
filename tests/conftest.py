"""Shared pytest setup: fixtures from tests/support, leak checks after every test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.leaks import Snapshot, check_no_leaks

pytest_plugins = ["tests.support.daemon", "tests.support.fixtures"]


@pytest.fixture(autouse=True)
def no_leaks(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Fail a test that leaves a process, netns, mount or link behind.

    Unit tests are exempt: they start nothing.
    """
    if "tests/unit" in str(request.node.path):
        yield
        return
    scope = str(tmp_path_factory.getbasetemp())
    before = Snapshot.take(scope)
    yield
    leaks = check_no_leaks(before, scope)
    assert not leaks, "leaked after test:\n  " + "\n  ".join(leaks)
