"""The bounds of ``image_limits`` and the checks that apply them.

A registry and the images it serves are untrusted: a manifest may declare thousands of
layers or a blob of any size, a small gzip layer may expand to terabytes or declare a
multi-GiB tar header. Every such quantity is checked against a configured bound before
it is allocated, downloaded or written, and a pull that crosses one fails with
:class:`~criv.errors.ImageLimitExceeded` naming the limit and its config key.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from criv.config import ImageLimitsConfig
from criv.errors import ImageLimitExceeded
from criv.image.media import Descriptor

SECTION = "image_limits"


def exceeded(what: str, detail: str, key: str) -> ImageLimitExceeded:
    """The error for ``what`` crossing ``image_limits.<key>``."""
    return ImageLimitExceeded(f"{what}: {detail} (limit {SECTION}.{key})")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n} bytes"


def check_manifest(
    limits: ImageLimitsConfig, what: str, config: Descriptor, layers: Sequence[Descriptor]
) -> None:
    """Refuse a manifest that declares too much, before anything it names is fetched."""
    if len(layers) > limits.max_layers:
        raise exceeded(what, f"{len(layers)} layers, more than {limits.max_layers}", "max_layers")
    if config.size > limits.max_config_bytes:
        raise exceeded(
            what,
            f"config of {config.size} bytes, more than {limits.max_config_kib} KiB",
            "max_config_kib",
        )
    for d in layers:
        check_blob_size(limits, f"{what}: layer {d.digest}", d.size)


def check_blob_size(limits: ImageLimitsConfig, what: str, size: int) -> None:
    if size > limits.max_blob_bytes:
        raise exceeded(
            what,
            f"declared size {size} bytes, more than {limits.max_blob_size_mib} MiB",
            "max_blob_size_mib",
        )


class ExpandBudget:
    """Expanded bytes of one image, charged by its layer unpacks as they read.

    Thread-safe: a pull unpacks its layers in several worker threads at once. Once the
    total is over the limit every further charge fails, so each running unpack stops.
    A layer this pull did not unpack itself (already there, or unpacked by another
    pull) is settled afterwards with its recorded size.
    """

    def __init__(self, limits: ImageLimitsConfig, what: str) -> None:
        self.limit = limits.max_image_bytes
        self.what = what
        self._lock = threading.Lock()
        self._by_layer: dict[str, int] = {}
        self.total = 0

    def charge(self, diff_id: str, n: int) -> None:
        with self._lock:
            self._by_layer[diff_id] = self._by_layer.get(diff_id, 0) + n
            self.total += n
            total = self.total
        if total > self.limit:
            raise exceeded(
                self.what,
                f"layers expand to more than {_mib(self.limit)}",
                "max_image_size_mib",
            )

    def settle(self, diff_id: str, expanded: int) -> None:
        """Charge what of ``expanded`` this pull has not charged for ``diff_id`` yet."""
        with self._lock:
            missing = max(0, expanded - self._by_layer.get(diff_id, 0))
        if missing:
            self.charge(diff_id, missing)
