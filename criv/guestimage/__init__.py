"""The guest image: a small kernel and an initramfs with the agent (see docs/guest-image.md)."""

from criv.guestimage.build import (
    DEFAULT_CACHE_ROOT,
    GuestImage,
    Inputs,
    build_guest_image,
    cached_image,
)

__all__ = ["DEFAULT_CACHE_ROOT", "GuestImage", "Inputs", "build_guest_image", "cached_image"]
