"""The fake guest for device tests (tests/unit/vsock/vsock_fakes.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.vsock.vsock_fakes import Guest


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    g = Guest(tmp_path)
    yield g
    g.dev.reset_all("test end")
    g.loop.close()
