"""Hypervisor.probe_capabilities: what criv asks libvirtd at start-up so that its probe of
QEMU's capabilities is not paid inside the first pod's createXML."""

from __future__ import annotations

from typing import Any

import libvirt
import pytest

from criv.errors import Internal
from criv.hypervisor.driver import Hypervisor


async def test_it_asks_for_the_x86_64_domain_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[Any, ...]] = []

    class Conn:
        def getDomainCapabilities(self, *args: Any) -> str:
            asked.append(args)
            return "<domainCapabilities/>"

    hv = Hypervisor("test:///default")
    monkeypatch.setattr(hv, "_connection", Conn)
    await hv.probe_capabilities("qemu")
    assert asked == [(None, "x86_64", None, "qemu", 0)]


async def test_a_libvirt_error_is_criv_error_naming_the_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Conn:
        def getDomainCapabilities(self, *args: Any) -> str:
            raise libvirt.libvirtError("cannot execute binary qemu-system-x86_64")

    hv = Hypervisor("test:///default")
    monkeypatch.setattr(hv, "_connection", Conn)
    with pytest.raises(Internal, match="probing QEMU's capabilities"):
        await hv.probe_capabilities()
