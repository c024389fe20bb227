"""The e2e suite: whole pod flows through kubelet-shaped CRI calls (tests/support/kubelet.py)
against a real criv, in `host` and `vm` isolation.

``criv_mode`` is a started criv (nothing pulled yet) for each mode; the vm half carries
the ``vm`` marker and the vm suite's teardown check (no criv domain left in libvirt).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.cri import (  # noqa: F401  (fixtures)
    Cri,
    cni_overrides,
    cri_factory,
    no_cgroup_leaks,
    registry,
)
from tests.support.vm import (  # noqa: F401  (fixtures)
    guest_image,
    libvirtd,
    template_dir,
    vm_config,
    vm_cri_factory,
)


@pytest.fixture(params=["host", pytest.param("vm", marks=pytest.mark.vm)])
def mode(request: pytest.FixtureRequest) -> str:
    """The runtime handler the pods ask for."""
    name: str = request.param
    return name


@pytest.fixture
def criv_mode(
    request: pytest.FixtureRequest,
    mode: str,
    cri_factory: Callable[..., Cri],  # noqa: F811  (the imported fixture)
) -> Cri:
    """A started criv for ``mode``, nothing pulled; its pods are torn down after the test.

    ``cri_factory`` is a direct dependency in both modes so that the session's CNI bridge
    and registry exist before the leak check's first snapshot."""
    if mode == "host":
        return cri_factory(pull=False)
    factory: Callable[..., Cri] = request.getfixturevalue("vm_cri_factory")
    return factory(pull=False)
