"""pytest plugin: registries and images for any test (``pytest_plugins`` in
tests/conftest.py lists this module).

- ``registry`` (session): an anonymous docker-registry on 127.0.0.1 holding a working
  busybox-static image as ``<registry.host>/library/busybox:latest``
  (``registry.busybox_ref``); ``registry.mirror_config()`` is the criv config that makes
  plain ``busybox`` resolve to it. Push more with ``registry.push_image(repo, tag, img)``
  and the builders in tests.support.images; use repositories of your own so tests do
  not see each other's tags.
- ``registry_factory`` (function): ``registry_factory(auth=None|"basic"|"token",
  users={...})`` starts a private registry, stopped at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import busybox_image
from tests.support.registry import RegistryServer

BUSYBOX_REPO = "library/busybox"


class TestRegistry(RegistryServer):
    """A RegistryServer that has busybox pushed (see ``busybox_ref``)."""

    __test__ = False  # not a test class

    @property
    def busybox_ref(self) -> str:
        return self.ref(BUSYBOX_REPO, "latest")

    def push_busybox(self) -> str:
        return self.push_image(BUSYBOX_REPO, "latest", busybox_image())


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestRegistry]:
    reg = TestRegistry(tmp_path_factory.mktemp("registry"))
    reg.start()
    try:
        reg.push_busybox()
        yield reg
    finally:
        reg.close()


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., TestRegistry]]:
    started: list[TestRegistry] = []

    def make(
        auth: str | None = None, users: dict[str, str] | None = None, **kw: Any
    ) -> TestRegistry:
        reg = TestRegistry(tmp_path / f"registry{len(started)}", auth=auth, users=users, **kw)
        started.append(reg)
        reg.start()
        return reg

    yield make
    for reg in started:
        reg.close()
