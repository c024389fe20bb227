"""Drop the clean page cache the agent's start left behind, once it serves (in a VM).

The guest root is a read-only disk (the host's criv/guestimage/rootdisk.py): what the
boot read from it, the agent's and grpc's bytecode above all, stays in the guest's page
cache though nothing reads it again. The host saves a template 2.5 s after the agent
serves, and every clone copies the template's RAM; pages dropped here are freed before
that, so free page reporting gives them back to the host and no clone copies them. Pages
still mapped (the interpreter, grpc's library) stay. What a pod reads later comes from
the disk again, through the host's page cache.
"""

from __future__ import annotations

import logging

log = logging.getLogger("criv_agent")

DROP_CACHES = "/proc/sys/vm/drop_caches"


def drop_clean_pages(path: str = DROP_CACHES) -> None:
    """Free the clean, unmapped page cache (``1``: not dentries or inodes). Never fails
    the agent: it only saves memory."""
    try:
        with open(path, "w") as f:
            f.write("1\n")
    except OSError as e:
        log.warning("dropping the page cache failed: %s", e)
