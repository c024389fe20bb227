"""``vm-image`` isolation: a pod whose image carries a bootable disk (docs/vm-images.md)."""

from criv.sandbox.vmimage.isolation import VmImageIsolation

__all__ = ["VmImageIsolation"]
