"""The vm fault suite: a real criv whose pods are VMs (fixtures from tests/support/vm.py
and tests/support/cri.py; the guest image from tests/vm/conftest.py)."""

from tests.support.cri import (  # noqa: F401  (fixtures)
    cni_overrides,
    cri_factory,
    no_cgroup_leaks,
    registry,
)
from tests.support.vm import (  # noqa: F401  (fixtures)
    libvirtd,
    template_dir,
    vm_config,
    vm_cri,
    vm_cri_factory,
)
