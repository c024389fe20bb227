"""Exec, Attach and PortForward end to end through the real daemon, against a vm pod.

The same cases as the host-mode suite (tests/integration/streaming/test_daemon_streaming.py,
both through tests/support/streaming.py), but the pod is a TCG VM: the streaming server's
data connections go through criv's userspace vhost-user-vsock backend (the pod's
``vs.1025`` unix socket) to the agent's data server in the guest, and port-forward dials
127.0.0.1 inside the guest. Each test boots one VM and runs all its cases in it, since a
boot under TCG costs seconds.
"""

from __future__ import annotations

import pytest

from tests.support import streaming as st
from tests.support.cri import Cri

pytestmark = pytest.mark.vm


@pytest.mark.timeout(240)
async def test_vm_exec(vm_cri: Cri) -> None:
    pod = vm_cri.run_pod("stream")
    cid = vm_cri.run(pod, "shell", ["sleep", "100000"])
    await st.check_exit_codes(vm_cri, cid)
    await st.check_stdin(vm_cri, cid)
    await st.check_tty_resize(vm_cri, cid)
    await st.check_disconnect_kills(vm_cri, cid)
    took = await st.check_big_stdout(vm_cri, cid)
    mib = st.BLOB / (1 << 20)
    print(f"vm exec stdout: {mib:.0f} MiB in {took:.1f} s = {mib / took:.1f} MiB/s")


@pytest.mark.timeout(180)
async def test_vm_attach_and_port_forward(vm_cri: Cri) -> None:
    pod = vm_cri.run_pod("stream")
    vm_cri.run(pod, "echo", st.ECHO_SERVER)
    counter = vm_cri.run(pod, "counter", st.COUNTER)
    cat = vm_cri.run(pod, "cat", ["cat"], stdin=True, stdin_once=True)
    tty = vm_cri.run(pod, "tty", ["sh"], stdin=True, tty=True)
    await st.check_attach_counter(vm_cri, counter)
    await st.check_attach_stdin_once(vm_cri, pod, cat)
    await st.check_attach_tty(vm_cri, tty)
    await st.check_port_forward(vm_cri, pod)
