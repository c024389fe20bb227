"""Fixtures for the host-mode fault suite: a real criv with CNI and the test registry
(tests/support/cri.py)."""

from tests.support.cri import (  # noqa: F401  (fixtures)
    cni_overrides,
    cri,
    cri_factory,
    no_cgroup_leaks,
    registry,
)
