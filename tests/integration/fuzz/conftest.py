"""Fixtures for the CRI fuzz test: a real criv in host mode with CNI and the test
registry (tests/support/cri.py)."""

from tests.support.cri import (  # noqa: F401  (fixtures)
    cni_overrides,
    cri,
    cri_factory,
    no_cgroup_leaks,
    registry,
)
