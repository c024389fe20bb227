"""``vm`` isolation, by concern: :mod:`.isolation` (the mode), :mod:`.host` (libvirt,
guest image, accel probe), :mod:`.backend` (vsock backend processes), :mod:`.share`
(the pod's shared dir), :mod:`.sweep` (orphans), :mod:`.layout`, :mod:`.console`."""

from criv.sandbox.vm.isolation import VmIsolation
from criv.sandbox.vm.layout import GUEST_SHARED

__all__ = ["GUEST_SHARED", "VmIsolation"]
