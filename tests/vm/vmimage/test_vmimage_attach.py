"""CRI Attach to a vm-image container: its VM's serial console, through criv's streaming
server. The VM test disk runs a root shell on ttyS0: a command typed in one attach session
runs in the guest and its output reaches every session (tty and not), and the container's
CRI log (the console stays logged while attached and after); leaving does not stop the
VM; a session open when the VM stops ends with a status."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.fixtures import TestRegistry
from tests.support.spdy_client import SpdyClient
from tests.support.streaming import attach_url, status_of, tty_attach, wait_for_stdout
from tests.support.vmimage import HANDLERS, start_disk_pod

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]


def wait_log(cri: Cri, pod: str, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in cri.log(pod, "vm"):
        assert time.monotonic() < deadline, f"{text!r} never reached the log"
        time.sleep(0.2)


async def sessions(cri: Cri, pod: str, cid: str) -> None:
    # a terminal session with stdin, and a plain one that only watches
    tty, sin, out, rz = await tty_attach(cri, cid)
    _r, watch = await SpdyClient.connect(attach_url(cri, cid), ["v4.channel.k8s.io"])
    assert watch is not None
    await tty.write(rz, b'{"Width": 100, "Height": 30}\n')  # a serial line: ignored
    await watch.open_stream({"streamtype": "error"})
    wout = await watch.open_stream({"streamtype": "stdout"})
    await watch.open_stream({"streamtype": "stderr"})
    await asyncio.sleep(1.5)  # QEMU notices an opened pty within a second
    await tty.write(sin, b"echo $((6*7))-attached; hostname\n")
    await wait_for_stdout(out, rb"42-attached\r?\nattachpod", timeout=30)
    await wait_for_stdout(wout, rb"42-attached\r?\nattachpod", timeout=10)
    await tty.close()
    # the watcher stays; the shell still answers another session
    again, sin2, out2, _rz2 = await tty_attach(cri, cid)
    await asyncio.sleep(1.5)
    await again.write(sin2, b"echo second-$((2+3))\n")
    await wait_for_stdout(out2, rb"second-5", timeout=30)
    await wait_for_stdout(wout, rb"second-5", timeout=10)
    await again.close()
    assert cri.status(cid).state == api_pb2.CONTAINER_RUNNING
    await watch.close()


async def attached_through_stop(cri: Cri, cid: str) -> dict[str, object]:
    _r, c = await SpdyClient.connect(attach_url(cri, cid), ["v4.channel.k8s.io"])
    assert c is not None
    err = await c.open_stream({"streamtype": "error"})
    out = await c.open_stream({"streamtype": "stdout"})
    await c.open_stream({"streamtype": "stderr"})
    await asyncio.sleep(1.5)
    stop = api_pb2.StopContainerRequest(container_id=cid, timeout=60)
    await asyncio.to_thread(cri.rt.StopContainer, stop, timeout=120)
    async with asyncio.timeout(30):
        await out.fin.wait()
        await err.fin.wait()
    await c.close()
    return status_of(bytes(err.data)) if err.data else {}


def test_attach_on_the_serial_console(
    vm_cri_factory: Callable[..., Cri], registry: TestRegistry, test_disk: Path, tmp_path: Path
) -> None:
    cri = vm_cri_factory(runtime={"handlers": HANDLERS})
    pod, cid = start_disk_pod(cri, registry, test_disk, tmp_path, "attachpod")
    r = cri.exec(cid, ["true"], timeout=180)  # booted: the console shell is up
    assert r.exit_code == 0, r
    wait_log(cri, pod, "criv-test-disk: ready")
    asyncio.run(sessions(cri, pod, cid))
    # what the sessions did is in the console log, and the log goes on after them
    wait_log(cri, pod, "42-attached")
    assert cri.exec(cid, ["sh", "-c", "echo after-attach-7 >/dev/console"]).exit_code == 0
    wait_log(cri, pod, "after-attach-7")
    # the VM stops while attached: the session ends (output EOF, then a status)
    status = asyncio.run(attached_through_stop(cri, cid))
    assert status.get("status", "Success") == "Success", status
    st = cri.status(cid)
    assert (st.state, st.exit_code) == (api_pb2.CONTAINER_EXITED, 0), st
