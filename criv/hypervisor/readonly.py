"""Read-only libvirt look-ups for criv's operator commands (`criv inspect`): a separate
read-only connection per call, so a command never changes a domain. Blocking."""

from __future__ import annotations

import libvirt

from criv.hypervisor.libvirtbase import translate


def domain_xml(uri: str, name: str) -> str:
    """The live XML of domain ``name`` (NotFound and friends as criv errors)."""
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as e:
        raise translate(e, f"libvirt at {uri}") from None
    try:
        xml: str = conn.lookupByName(name).XMLDesc(0)
        return xml
    except libvirt.libvirtError as e:
        raise translate(e, f"domain {name}") from None
    finally:
        conn.close()
