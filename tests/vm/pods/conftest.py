"""The vm pod suite: a real criv whose pods are VMs, through CRI. The fixtures live in
tests/support/vm.py (shared with the e2e suite) and tests/support/cri.py; the guest image
comes from tests/vm/conftest.py."""

from tests.support.cri import (  # noqa: F401  (fixtures)
    Cri,
    cni_overrides,
    config_for,
    cri_factory,
    no_cgroup_leaks,
    registry,
)
from tests.support.vm import (  # noqa: F401  (fixtures)
    any_cri,
    libvirtd,
    template_dir,
    vm_config,
    vm_cri,
    vm_cri_factory,
)
