"""Fixtures for the agent integration suite: a busybox rootfs (built once), one real
criv-agent per test, driven through the generated gRPC stub. Needs root and crun."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent_harness import BUSYBOX, CRUN, Agent, build_rootfs, running_agent


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists(CRUN):
        return "needs crun (Debian package crun)"
    if not os.path.exists(BUSYBOX):
        return "needs busybox-static"
    return None


@pytest.fixture(scope="session")
def rootfs_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("agent-rootfs")
    yield build_rootfs(d / "rootfs")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def agent(tmp_path: Path, rootfs_template: Path) -> Iterator[Agent]:
    with running_agent(tmp_path, rootfs_template) as a:
        yield a
