"""Fixtures for the runtime lifecycle suite: see tests/support/cri.py (shared with the
streaming suite)."""

from tests.support.cri import (  # noqa: F401  (fixtures)
    Cri,
    cni_overrides,
    config_for,
    cri,
    cri_factory,
    no_cgroup_leaks,
    registry,
)
