"""User namespaces (hostUsers: false) in host isolation: the scenario in
tests/support/userns.py (the same one runs in a vm pod in tests/vm/pods/test_vm_userns.py),
and Status advertising them for every handler but vm-image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import userns
from tests.support.cri import Cri

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_userns_pod_maps_ids_and_keeps_the_rootfs_usable(
    cri_factory: Callable[..., Cri], tmp_path: Path
) -> None:
    # criv's state dir is outside pytest's tree (tests/support/daemon.py): crun resolves
    # the rootfs path as the container's mapped root, so its parents must be searchable
    cri = cri_factory()
    assert userns.handlers_advertise(cri) == {"": True, "host": True, "vm": True}
    vol = tmp_path / "vol"
    vol.mkdir()
    userns.pod_maps_ids_and_keeps_the_rootfs_usable(cri, vol, create_as_dac_override=True)
