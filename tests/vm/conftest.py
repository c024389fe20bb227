"""The guest image for VM tests: built once per machine (cached by content hash), then reused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from criv.guestimage import DEFAULT_CACHE_ROOT, GuestImage, build_guest_image


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    cache = Path(os.environ.get("CRIV_GUEST_IMAGE_CACHE", str(DEFAULT_CACHE_ROOT)))
    return build_guest_image(cache, lambda line: print(f"[guest-image] {line}", flush=True))
