"""User namespaces (hostUsers: false) in a vm pod: the scenario of the host suite
(tests/support/userns.py). criv builds the overlay on the host on idmapped image layers
as in host mode; the guest sees its files owned by the mapped ids through virtio-fs,
the agent gives the container the same user namespace in the guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import userns
from tests.support.cri import Cri

pytestmark = pytest.mark.vm


@pytest.mark.timeout(300)
def test_vm_userns_pod_maps_ids_and_keeps_the_rootfs_usable(vm_cri: Cri, tmp_path: Path) -> None:
    assert userns.handlers_advertise(vm_cri) == {"": True, "host": True, "vm": True}
    vol = tmp_path / "vol"
    vol.mkdir()
    userns.pod_maps_ids_and_keeps_the_rootfs_usable(vm_cri, vol, create_as_dac_override=False)
