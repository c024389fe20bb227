"""A cloned guest warms its own code paths while it waits for its pod (a spare VM).

Under TCG (software emulation) QEMU translates guest code the first time it runs and
keeps the translation; a VM cloned from a template starts with none (translations are not
part of the saved state). So a clone's first RPCs pay for translating the kernel's socket
paths, the Python interpreter, grpc, a process's start and rtnetlink again. A spare VM
(the host's criv/sandbox/vm/spares.py) runs before its pod comes, so the agent spends that
time: once it has served ``WARM_AFTER`` seconds of guest running time with no call, it
makes a Health call to itself over its local gRPC socket, runs a read-only ``ip -batch``
(a process start: exec, the dynamic loader and libc, at the fixed addresses every later
helper such as crun has them, fixedlayout.py) and reads the loopback link over rtnetlink
(the way SetupSandbox configures the pod's network, rtnetlink.py).

None of the other starts reach it: the host saves a template 2.5 s after its agent
serves (the guest's clock does not run while a VM is paused, so a clone resumes with that
much of the wait spent); a clone started for a pod gets Health within a second of running,
and a cold-booted pod's agent at once. Under KVM it costs a few milliseconds, once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from criv_agent import rtnetlink

log = logging.getLogger("criv_agent")

# 1 s past the template's save (SETTLE_SECONDS): a spare warms up 1 s after it resumes
WARM_AFTER = 3.5
# what the warm-up asks of ip: reads only
IP_READS = b"link show\naddress show\nroute show\n"
LOOPBACK = 1  # its ifindex: the first interface of every network namespace


async def warm_when_idle(first_call: asyncio.Event, control_path: str) -> None:
    """Warm up unless a call comes within ``WARM_AFTER`` s (see the module's doc)."""
    try:
        await asyncio.wait_for(first_call.wait(), WARM_AFTER)
        return  # a pod (or the host's ready check) came first
    except TimeoutError:
        pass
    t0 = time.monotonic()
    try:
        await _health(control_path)
        await _ip_reads()
        _netlink_reads()
    except Exception as e:  # a warm-up is an optimisation: it never fails the agent
        log.warning("warm-up failed: %s: %s", type(e).__name__, e)
        return
    log.info("warm-up done in %.3fs", time.monotonic() - t0)


async def _health(control_path: str) -> None:
    import grpc

    from criv_agent.api.agent.v1 import agent_pb2, agent_pb2_grpc

    async with grpc.aio.insecure_channel(f"unix:{control_path}") as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        await stub.Health(agent_pb2.HealthRequest(), timeout=30)


async def _ip_reads() -> None:
    proc = await asyncio.create_subprocess_exec(
        "ip", "-batch", "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.wait_for(proc.communicate(IP_READS), 30)


def _netlink_reads() -> None:
    with rtnetlink.RtNetlink() as nl:
        nl.call(rtnetlink.link_get(LOOPBACK))
