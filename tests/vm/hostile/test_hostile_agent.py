"""A modified agent (docs/security.md: the guest controls every byte the agent sends).

The guest image is booted with one more initramfs archive appended, which the kernel
unpacks over the first: it replaces the agent's launcher with a modified one.

- The forging launcher wraps the agent's ``Events`` stream, so that whenever guest root
  writes a container id to ``/run/criv-forge`` the agent also sends an EXITED event (exit
  code 99) for that id. An attacker pod's guest root uses it against a container of
  another pod; the assertions are on the host: the forged event reached criv and was
  dropped, the other pod's container is untouched.
- The staying launcher answers ShutdownSandbox and then keeps the VM up (no power-off,
  no exit for the init to power off after): criv must end the VM itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from criv.guestimage import DEFAULT_CACHE_ROOT, GuestImage, Inputs, build_guest_image
from criv.guestimage.cpio import write_cpio
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.vm import criv_domains

pytestmark = pytest.mark.vm

TRIGGER = "/run/criv-forge"
FORGING_LAUNCHER = f'''#!/usr/bin/python3
import asyncio, os, sys

from criv_agent import service
from criv_agent.api.agent.v1 import agent_pb2

real_events = service.AgentService.Events


async def Events(self, request, context):
    out = asyncio.Queue()

    async def real():
        async for ev in real_events(self, request, context):
            await out.put(ev)

    async def forge():
        while True:
            await asyncio.sleep(0.2)
            try:
                with open("{TRIGGER}") as f:
                    victim = f.read().strip()
                os.unlink("{TRIGGER}")
            except OSError:
                continue
            info = agent_pb2.ContainerInfo(container_id=victim, state=2, exit_code=99,
                                           reason="Forged", finished_at_ns=1)
            await out.put(agent_pb2.Event(kind=2, container_id=victim, info=info))

    tasks = [asyncio.ensure_future(real()), asyncio.ensure_future(forge())]
    try:
        while True:
            yield await out.get()
    finally:
        for t in tasks:
            t.cancel()


service.AgentService.Events = Events
from criv_agent.main import main

sys.exit(main())
'''


# guest root that answers ShutdownSandbox, then declines to power off and keeps running
STAYING_LAUNCHER = """#!/usr/bin/python3
import time

from criv_agent import poweroff
from criv_agent.main import main

poweroff.power_off = lambda: OSError(1, "declined")
main()
while True:
    time.sleep(3600)
"""


def launcher_initrd(image: GuestImage, out: Path, launcher_text: str) -> Path:
    """The guest image's initramfs with ``launcher_text`` as the agent's launcher appended
    over it (an image with its root in the initramfs: a root disk is read-only)."""
    cache = Path(os.environ.get("CRIV_GUEST_IMAGE_CACHE", str(DEFAULT_CACHE_ROOT)))
    image = build_guest_image(cache, lambda s: None, replace(Inputs.default(), root="initramfs"))
    assert image.root_disk is None
    root = out / "overlay"
    launcher = root / "usr" / "local" / "bin" / "criv-agent"
    launcher.parent.mkdir(parents=True)
    for d in (root / "usr", root / "usr" / "local", launcher.parent):
        d.chmod(0o755)
    launcher.write_text(launcher_text)
    launcher.chmod(0o755)
    initrd = out / "agent-initramfs.cpio"
    with initrd.open("wb") as f:
        f.write(image.initrd.read_bytes())
        write_cpio(root, f)
    initrd.chmod(0o644)
    return initrd


@pytest.fixture
def launcher_cri(
    vm_cri_factory: Callable[..., Cri], guest_image: GuestImage, tmp_path: Path
) -> Callable[[str], Cri]:
    """A criv whose vm pods boot the guest image with the given text as the agent's
    launcher."""

    def make(launcher_text: str) -> Cri:
        initrd = launcher_initrd(guest_image, tmp_path, launcher_text)
        return vm_cri_factory(vm={"initrd": str(initrd), "root_disk": ""})

    return make


@pytest.mark.timeout(600)
def test_a_forged_event_for_another_pods_container_is_dropped(
    launcher_cri: Callable[[str], Cri],
) -> None:
    cri = launcher_cri(FORGING_LAUNCHER)
    victim_pod = cri.run_pod("victim")
    victim = cri.run(victim_pod, "victim", ["sleep", "3600"])
    sb_sec = api_pb2.LinuxSandboxSecurityContext(privileged=True)
    attacker_pod = cri.run_pod(
        "attacker", linux=api_pb2.LinuxPodSandboxConfig(security_context=sb_sec)
    )
    attacker = cri.run(
        attacker_pod, "attacker", ["sleep", "3600"],
        security=api_pb2.LinuxContainerSecurityContext(
            privileged=True, namespace_options=api_pb2.NamespaceOption(pid=api_pb2.NODE)
        ),
    )  # fmt: skip
    own = cri.run(attacker_pod, "own", ["sleep", "3600"])

    # guest root in the attacker's VM (the agent's mount namespace) pulls the trigger
    def forge(cid: str) -> None:
        r = cri.exec(attacker, ["nsenter", "-t", "1", "-m", "--", "sh", "-c",
                                f"echo {cid} > {TRIGGER}"])  # fmt: skip
        assert r.exit_code == 0, r.stderr

    forge(victim)
    dropped = f"event for container {victim[:12]} of another pod; dropped"
    deadline = time.monotonic() + 60
    while dropped not in cri.proc.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the forged event never reached criv"
        time.sleep(0.5)
    st = cri.status(victim)
    assert st.state == api_pb2.CONTAINER_RUNNING, st
    assert st.exit_code == 0 and st.reason != "Forged"
    assert cri.exec(victim, ["echo", "alive"]).stdout == b"alive\n"

    # the same mechanism works on the attacker's own pod: the guest may lie about its
    # own containers (they are its to lose), which shows the forged events are applied
    # when they are the sender's; nobody else's
    forge(own)
    deadline = time.monotonic() + 60
    while cri.status(own).state != api_pb2.CONTAINER_EXITED:
        assert time.monotonic() < deadline, "the forging agent's events never applied"
        time.sleep(0.5)
    assert cri.status(own).exit_code == 99
    assert cri.status(victim).state == api_pb2.CONTAINER_RUNNING


@pytest.mark.timeout(600)
def test_a_guest_that_stays_up_after_shutdown_is_destroyed(
    launcher_cri: Callable[[str], Cri],
) -> None:
    cri = launcher_cri(STAYING_LAUNCHER)
    pod = cri.run_pod("stays-up")
    cri.run(pod, "c", ["sleep", "3600"])
    domain = cri.isolation_state(pod)["domain"]
    cri.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
    # the agent answered and its VM ran on: criv waited its deadline, then destroyed it
    assert "VM still up after the agent left: destroying" in cri.proc.logs()
    assert domain not in criv_domains(templates=True)
    assert cri.pod_status(pod).state == api_pb2.SANDBOX_NOTREADY
    cri.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
