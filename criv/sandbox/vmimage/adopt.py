"""Taking a vm-image pod back after a criv restart: its agent record (:mod:`.record`,
checked) against what libvirt runs under the pod's domain name.

=================  ===================  ============================================
record says        libvirt has          the container becomes
=================  ===================  ============================================
no container       nothing              nothing (the pod has none yet)
CREATED            nothing              CREATED, as it was
CREATED            our VM               CREATED: the VM of a StartContainer that
                                        criv's end cut short is destroyed, its
                                        console dropped (kubelet starts it again)
RUNNING/STOPPING   our VM, same UUID    RUNNING: its console followed on from the
                                        recorded mark, its VM watched, SSH with the
                                        recorded host key pin and the pod's key
RUNNING/STOPPING   nothing              EXITED 255 ``VMGone`` (the VM stopped while
                                        criv was down; the rest of its console is
                                        copied into the log, its tail in the message)
EXITED             nothing              EXITED, as it was (its disk can be committed)
anything else      (a VM the record     not trusted: :class:`Untrusted`; the pod is
                   does not account     not re-adopted (recovery destroys its VM and
                   for, another UUID,   marks it NOTREADY)
                   another owner)
=================  ===================  ============================================

A domain libvirt still lists but that no longer runs counts as nothing (and is
destroyed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from enum import StrEnum
from pathlib import Path

from criv.errors import AgentError, CrivError
from criv.hypervisor.domaininfo import DomainInfo
from criv.sandbox.vmimage import machine
from criv.sandbox.vmimage.boxstate import VM_STATES, BoxState
from criv.sandbox.vmimage.console import ConsoleLog
from criv.sandbox.vmimage.container import VmContainer, box_paths
from criv.sandbox.vmimage.keeper import BoxKeeper
from criv.sandbox.vmimage.record import AgentRecord, BoxRecord

log = logging.getLogger("criv.sandbox.vmimage")


class Untrusted(AgentError):
    """The record does not account for what runs: the pod is not re-adopted."""


class Plan(StrEnum):
    EMPTY = "empty"
    KEEP = "keep"
    CUT_SHORT = "cut-short"
    ADOPT = "adopt"
    GONE = "gone"
    UNTRUSTED = "untrusted"


def plan(rec: AgentRecord, domain: DomainInfo | None, owner: str) -> tuple[Plan, str]:
    """What to do (the table in the module docstring), and why where it is UNTRUSTED.
    ``domain``: the pod's domain if it runs; ``owner``: what criv tags its vm-image
    domains with."""
    box = rec.container
    if domain is not None and domain.owner != owner:
        return Plan.UNTRUSTED, f"domain {domain.name} is not this criv's (owner {domain.owner!r})"
    if box is None:
        if domain is None:
            return Plan.EMPTY, ""
        return Plan.UNTRUSTED, f"domain {domain.name} runs but the record names no container"
    if box.state is BoxState.CREATED:
        return (Plan.KEEP if domain is None else Plan.CUT_SHORT), ""
    if box.state is BoxState.EXITED:
        if domain is None:
            return Plan.KEEP, ""
        return Plan.UNTRUSTED, f"domain {domain.name} runs but container {box.cid[:12]} exited"
    if domain is None:
        return Plan.GONE, ""
    if domain.uuid != box.domain_uuid:
        return Plan.UNTRUSTED, (
            f"domain {domain.name} is {domain.uuid}, not container {box.cid[:12]}'s "
            f"{box.domain_uuid}"
        )
    return Plan.ADOPT, ""


def rebuild(b: BoxRecord, pod_state: Path, root: Path, pod_id: str) -> VmContainer:
    """The container from its record; every path from the ids and criv's own layout."""
    paths = box_paths(pod_state, root, pod_id, b.cid)
    base = machine.BaseDisk(root / "bases" / b.base, b.base_format, b.disk_name)
    return VmContainer(
        cid=b.cid, base=base, dir=paths.dir, overlay=paths.overlay, seed=paths.seed,
        uefi_vars=paths.uefi_vars, user=b.user, created_at_ns=b.created_at_ns,
        firmware=b.firmware, state=b.state,
        started_at_ns=b.started_at_ns, finished_at_ns=b.finished_at_ns,
        exit_code=b.exit_code, reason=b.reason, message=b.message, domain_uuid=b.domain_uuid,
    )  # fmt: skip


async def restore(
    keeper: BoxKeeper,
    vms: machine.Machines,
    rec: AgentRecord,
    pod_state: Path,
    root: Path,
    owner: str,
) -> Plan:
    """Bring ``keeper`` (a fresh agent's) to what ``rec`` and libvirt say; raises
    :class:`Untrusted` where they disagree (the caller does not serve the pod)."""
    pod = keeper.pod
    domain = await vms.lookup(pod)
    if domain is not None and not domain.alive:
        with contextlib.suppress(CrivError):
            await vms.destroy(pod)
        domain = None
    what, why = plan(rec, domain, owner)
    if what is Plan.UNTRUSTED:
        raise Untrusted(f"vm-image pod {pod.id[:12]}: its record cannot be trusted: {why}")
    b = rec.container
    if b is None:
        return what
    box = rebuild(b, pod_state, root, pod.id)
    console, cri = box.dir / "console.log", box.dir / "serial.log"
    try:
        if what is Plan.KEEP and box.state is BoxState.EXITED:
            box.console = ConsoleLog(console, cri, ended=True)
        elif what is Plan.CUT_SHORT:
            await vms.destroy(pod)
            for p in (console, cri):
                await asyncio.to_thread(p.unlink, missing_ok=True)
            box.domain_uuid = ""
        elif what in (Plan.ADOPT, Plan.GONE):
            box.console = await ConsoleLog.resume(console, cri, b.mark, b.pin, keeper.save_quietly)
    except OSError as e:
        raise Untrusted(f"vm-image pod {pod.id[:12]}: its container's files: {e}") from None
    keeper.box = box
    if what is Plan.ADOPT:
        assert box.console is not None
        if box.state is BoxState.STOPPING:
            box.move(BoxState.RUNNING)  # kubelet retries the stop
        box.console.start()
        keeper.watch(box)
    elif what is Plan.GONE:
        assert box.console is not None and box.state in VM_STATES
        await box.console.finish()
        box.gone(await asyncio.to_thread(box.console.tail))
    await keeper.save()
    return what
