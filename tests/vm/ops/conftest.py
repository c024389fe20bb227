"""The operator suite with vm pods: fixtures from tests/support/vm.py and cri.py; the guest
image comes from tests/vm/conftest.py."""

from tests.support.cri import (  # noqa: F401  (fixtures)
    Cri,
    cni_overrides,
    config_for,
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
