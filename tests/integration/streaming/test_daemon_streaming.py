"""Exec, Attach and PortForward end to end through the real daemon, in `host` mode.

`criv serve` runs a busybox pod (real crun, CNI, the pod's own criv-agent); the CRI
calls return URLs on criv's streaming server, which the tests' own SPDY client (written
from the facts sheet) and aiohttp's WebSocket client then use, exactly as kubelet,
kubectl and crictl would. Needs root, crun and the CNI plugins (skipped otherwise). The
cases live in tests/support/streaming.py; tests/vm/pods/test_vm_streaming.py runs the
same ones against a vm pod.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support import cri as support
from tests.support import streaming as st
from tests.support.cri import Cri
from tests.support.spdy_client import SpdyClient, http_request, spdy_exec
from tests.support.streaming import attach_url, exec_url, port_forward_url, wait_for_stdout

# The runtime suite's fixtures (a real criv with CNI and busybox, and its cgroup check).
cni_overrides = support.cni_overrides
cri_factory = support.cri_factory
cri = support.cri
no_cgroup_leaks = support.no_cgroup_leaks
registry = support.registry

pytestmark = pytest.mark.integration


@pytest.fixture
def pod(cri: Cri) -> str:
    return cri.run_pod("stream")


@pytest.mark.timeout(180)
async def test_exec_spdy_and_websocket(cri: Cri, pod: str) -> None:
    cid = cri.run(pod, "shell", ["sleep", "100000"])
    await st.check_exit_codes(cri, cid)
    await st.check_stdin(cri, cid)
    await st.check_tty_resize(cri, cid)
    took = await st.check_big_stdout(cri, cid)
    print(f"host exec stdout: {st.BLOB >> 20} MiB in {took:.2f} s")


@pytest.mark.timeout(180)
async def test_attach(cri: Cri, pod: str) -> None:
    counter = cri.run(pod, "counter", st.COUNTER)
    await st.check_attach_counter(cri, counter)
    cat = cri.run(pod, "cat", ["cat"], stdin=True, stdin_once=True)
    await st.check_attach_stdin_once(cri, pod, cat)
    tty = cri.run(pod, "tty", ["sh"], stdin=True, tty=True)
    await st.check_attach_tty(cri, tty)


@pytest.mark.timeout(180)
async def test_port_forward(cri: Cri, pod: str) -> None:
    cri.run(pod, "echo", st.ECHO_SERVER)
    await st.check_port_forward(cri, pod)


@pytest.mark.timeout(180)
async def test_tokens_and_cri_errors(cri_factory: Callable[..., Cri]) -> None:
    cri = cri_factory(streaming={"token_ttl_seconds": 1})
    pod = cri.run_pod("tokens")
    cid = cri.run(pod, "shell", ["sleep", "100000"])
    info = json.loads(cri.rt.Status(api_pb2.StatusRequest(verbose=True), timeout=10).info["info"])
    base = info["streaming"]["url"]
    assert base.startswith("http://127.0.0.1:")

    url = exec_url(cri, cid, ["true"])
    assert url.startswith(base + "/exec/")
    r = await spdy_exec(url)
    assert r.status["status"] == "Success"
    for bad in (url, base + "/exec/AAAAAAAA", base + "/attach/" + url.rsplit("/", 1)[1]):
        resp, c = await SpdyClient.connect(bad, ["v4.channel.k8s.io"])
        assert c is None and resp.status == 404 and resp.body == b"404 page not found\n"
    url = exec_url(cri, cid, ["true"])
    await asyncio.sleep(1.5)
    resp, c = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    assert c is None and resp.status == 404
    # a request refused for want of a protocol still consumes the token
    url = port_forward_url(cri, pod)
    for want in (400, 404):
        resp, _r, w = await http_request(url, "GET", [])
        w.close()
        assert resp.status == want

    def code(fn: Callable[[], Any]) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as e:
            fn()
        c: grpc.StatusCode = e.value.code()
        return c

    assert code(lambda: exec_url(cri, "", ["true"])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(lambda: exec_url(cri, cid, [])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(lambda: attach_url(cri, "")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(lambda: port_forward_url(cri, "")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(lambda: exec_url(cri, "nosuchcontainer", ["true"])) == grpc.StatusCode.NOT_FOUND
    assert code(lambda: attach_url(cri, "nosuchcontainer")) == grpc.StatusCode.NOT_FOUND
    assert code(lambda: port_forward_url(cri, "nosuchpod")) == grpc.StatusCode.NOT_FOUND


@pytest.mark.timeout(180)
async def test_daemon_stop_ends_live_sessions(cri: Cri, pod: str) -> None:
    cid = cri.run(pod, "shell", ["sleep", "100000"])
    url = exec_url(cri, cid, ["sh", "-c", "echo $$; exec sleep 1000"], stderr=False)
    _resp, c = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    assert c is not None
    await c.open_stream({"streamtype": "error"})
    out = await c.open_stream({"streamtype": "stdout"})
    await wait_for_stdout(out, rb"\d+\n")
    pid = int(out.data.split()[0])
    # SIGTERM with a session live: criv ends it and exits cleanly (the pod keeps running)
    assert await asyncio.to_thread(cri.proc.stop, 30) == 0, cri.proc.logs()
    async with asyncio.timeout(5):
        await c.closed.wait()
    await c.close()
    await asyncio.to_thread(cri.proc.start)
    # the exec'd process went with its stream
    async with asyncio.timeout(10):
        while cri.exec(cid, ["kill", "-0", str(pid)]).exit_code == 0:
            await asyncio.sleep(0.1)
