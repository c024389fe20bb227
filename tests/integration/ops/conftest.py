"""The operator suite: a real criv with host-mode pods (tests/support/cri.py)."""

from tests.support.cri import (  # noqa: F401  (fixtures)
    Cri,
    cni_overrides,
    config_for,
    cri,
    cri_factory,
    no_cgroup_leaks,
    registry,
)
