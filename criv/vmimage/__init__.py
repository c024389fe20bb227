"""Booting VM disk images as pods (the `vm-image` isolation mode): seeds, containerDisks."""
