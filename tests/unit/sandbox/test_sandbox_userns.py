"""User namespace helpers of the sandbox layer (criv/sandbox/userns.py): which host ids
the container's root maps to, and which isolation modes refuse user namespaces (vm-image only)."""

from __future__ import annotations

import pytest

from criv.errors import InvalidArgument
from criv.sandbox.userns import (
    ROOTFS_BY_HOST_PATH,
    SUPPORTED_MODES,
    IdMapping,
    UserNs,
    refuse_unless_supported,
)


def test_host_root_is_where_container_root_maps() -> None:
    ns = UserNs(uids=(IdMapping(0, 65536, 65536),), gids=(IdMapping(0, 131072, 10),))
    assert ns.host_root() == (65536, 131072)
    split = UserNs(
        uids=(IdMapping(1000, 5000, 10), IdMapping(0, 7000, 1)),
        gids=(IdMapping(0, 9000, 1),),
    )
    assert split.host_root() == (7000, 9000)
    assert UserNs(uids=(IdMapping(1, 5000, 10),), gids=(IdMapping(0, 1, 1),)).host_root() is None


def test_only_vm_image_isolation_refuses_a_user_namespace_by_handler() -> None:
    ns = UserNs(uids=(IdMapping(0, 65536, 65536),), gids=(IdMapping(0, 65536, 65536),))
    refuse_unless_supported("host", "", ns)
    refuse_unless_supported("vm", "kata", ns)  # the host idmaps its overlay, as for host
    refuse_unless_supported("vm-image", "disk", None)  # none asked
    with pytest.raises(InvalidArgument, match="runtime handler 'disk' runs pods in vm-image"):
        refuse_unless_supported("vm-image", "disk", ns)
    assert sorted(SUPPORTED_MODES) == ["host", "vm"]
    assert sorted(ROOTFS_BY_HOST_PATH) == ["host"]
