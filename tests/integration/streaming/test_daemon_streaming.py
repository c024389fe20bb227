"""Exec, Attach and PortForward end to end through the real daemon, in `host` mode.

`criv serve` runs a busybox pod (real crun, CNI, the pod's own criv-agent); the CRI
calls return URLs on criv's streaming server, which the tests' own SPDY client (written
from the facts sheet) and aiohttp's WebSocket client then use, exactly as kubelet,
kubectl and crictl would. Needs root, crun and the CNI plugins (skipped otherwise).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import grpc
import pytest
from spdy_client import SpdyClient, forward_one, http_request, spdy_exec

from criv_agent.api.runtime.v1 import api_pb2
from tests.support import cri as support
from tests.support.cri import Cri

# The runtime suite's fixtures (a real criv with CNI and busybox, and its cgroup check).
cni_overrides = support.cni_overrides
cri_factory = support.cri_factory
cri = support.cri
no_cgroup_leaks = support.no_cgroup_leaks
registry = support.registry

pytestmark = pytest.mark.integration

BLOB = 100 << 20
ECHO_PORT = 7777
COUNTER = ["sh", "-c", "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done"]


def exec_url(cri: Cri, cid: str, cmd: list[str], **kw: Any) -> str:
    kw.setdefault("stdout", True)
    kw.setdefault("stderr", not kw.get("tty", False))
    resp = cri.rt.Exec(api_pb2.ExecRequest(container_id=cid, cmd=cmd, **kw), timeout=10)
    return str(resp.url)


def attach_url(cri: Cri, cid: str, **kw: Any) -> str:
    kw.setdefault("stdout", True)
    kw.setdefault("stderr", not kw.get("tty", False))
    resp = cri.rt.Attach(api_pb2.AttachRequest(container_id=cid, **kw), timeout=10)
    return str(resp.url)


def port_forward_url(cri: Cri, pod_id: str, ports: list[int] | None = None) -> str:
    req = api_pb2.PortForwardRequest(pod_sandbox_id=pod_id, port=ports or [])
    return str(cri.rt.PortForward(req, timeout=10).url)


async def ws_session(
    url: str,
    send: Sequence[bytes] = (),
    *,
    until: Callable[[dict[int, bytes]], bool] | None = None,
    timeout: float = 30,
) -> dict[int, bytes]:
    """A v5.channel.k8s.io session: send the channel messages, collect what comes back
    (until the server closes, or ``until`` says enough)."""
    got: dict[int, bytes] = {}
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=["v5.channel.k8s.io"]) as ws,
        asyncio.timeout(timeout),
    ):
        assert ws.protocol == "v5.channel.k8s.io"
        for m in send:
            await ws.send_bytes(m)
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            got[msg.data[0]] = got.get(msg.data[0], b"") + msg.data[1:]
            if until is not None and until(got):
                break
    return got


def status_of(raw: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(raw)
    return doc


async def wait_for_stdout(c: SpdyClient, stream: Any, pattern: bytes, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while not re.search(pattern, bytes(stream.data)):
            stream.got_data.clear()
            await stream.got_data.wait()


@pytest.fixture
def pod(cri: Cri) -> str:
    return cri.run_pod("stream")


@pytest.mark.timeout(180)
async def test_exec_spdy_and_websocket(cri: Cri, pod: str) -> None:
    cid = cri.run(pod, "shell", ["sleep", "100000"])

    # exit codes on the error stream: SPDY v4 and WebSocket v5
    r = await spdy_exec(exec_url(cri, cid, ["sh", "-c", "echo out; echo err >&2; exit 7"]))
    assert (r.stdout, r.stderr) == (b"out\n", b"err\n")
    assert r.protocol == "v5.channel.k8s.io"
    st = r.status
    assert st["reason"] == "NonZeroExitCode"
    assert st["details"] == {"causes": [{"reason": "ExitCode", "message": "7"}]}
    r = await spdy_exec(exec_url(cri, cid, ["sh", "-c", "exit 7"]), protocols=["v4.channel.k8s.io"])
    assert r.protocol == "v4.channel.k8s.io" and r.status["reason"] == "NonZeroExitCode"
    got = await ws_session(exec_url(cri, cid, ["sh", "-c", "exit 7"]))
    assert status_of(got[3])["details"]["causes"][0] == {"reason": "ExitCode", "message": "7"}

    # stdin echoed through cat, with EOF: SPDY FIN / WebSocket v5 close message
    payload = os.urandom(300_000)
    r = await spdy_exec(exec_url(cri, cid, ["cat"], stdin=True), stdin=payload)
    assert r.stdout == payload and r.status["status"] == "Success"
    url = exec_url(cri, cid, ["cat"], stdin=True)
    got = await ws_session(url, [b"\x00via websocket\n", b"\xff\x00"])
    assert got[1] == b"via websocket\n" and status_of(got[3])["status"] == "Success"

    # a terminal: stty size after a resize, over SPDY and WebSocket (channel 4)
    cmd = ["sh", "-c", "read x; stty size"]
    url = exec_url(cri, cid, cmd, tty=True, stdin=True)
    r = await spdy_exec(url, stdin=b"go\n", tty=True, stderr=False, resize=(111, 33))
    assert b"33 111" in r.stdout and r.status["status"] == "Success"
    url = exec_url(cri, cid, cmd, tty=True, stdin=True)
    resize = b"\x04" + json.dumps({"Width": 97, "Height": 21}).encode()
    got = await ws_session(url, [resize, b"\x00go\n"])
    assert b"21 97" in got[1] and status_of(got[3])["status"] == "Success"

    # 100 MiB through stdout, hash-checked
    made = cri.exec(cid, ["sh", "-c", f"head -c {BLOB} /dev/urandom > /blob; sha256sum /blob"])
    assert made.exit_code == 0, made.stderr
    want = made.stdout.split()[0].decode()
    r = await spdy_exec(exec_url(cri, cid, ["cat", "/blob"], stderr=False), stderr=False)
    assert len(r.stdout) == BLOB and hashlib.sha256(r.stdout).hexdigest() == want
    assert r.status["status"] == "Success"


@pytest.mark.timeout(180)
async def test_attach(cri: Cri, pod: str) -> None:
    # a counter: whatever it prints from now on, in order, over SPDY and WebSocket
    counter = cri.run(pod, "counter", COUNTER)
    resp, c = await SpdyClient.connect(attach_url(cri, counter), ["v4.channel.k8s.io"])
    assert resp.status == 101 and c is not None
    await c.open_stream({"streamtype": "error"})
    out = await c.open_stream({"streamtype": "stdout"})
    await c.open_stream({"streamtype": "stderr"})
    await wait_for_stdout(c, out, rb"(\d+\n){5}")
    nums = [int(x) for x in bytes(out.data).split(b"\n")[:-1]]
    assert nums == list(range(nums[0], nums[0] + len(nums)))
    await c.close()
    got = await ws_session(attach_url(cri, counter), until=lambda g: g.get(1, b"").count(b"\n") > 3)
    nums2 = [int(x) for x in got[1].split(b"\n")[:3]]
    assert nums2[0] > nums[-1] and nums2 == list(range(nums2[0], nums2[0] + 3))
    # leaving an attach never stops the container
    assert cri.status(counter).state == api_pb2.CONTAINER_RUNNING

    # stdin to `cat` (stdin_once): the session's EOF closes the container's stdin
    cat = cri.run(pod, "cat", ["cat"], stdin=True, stdin_once=True)
    r = await spdy_exec(attach_url(cri, cat, stdin=True), stdin=b"hello attach\n")
    assert r.stdout == b"hello attach\n" and r.status["status"] == "Success"
    st = await asyncio.to_thread(cri.wait_exited, cat)
    assert st.exit_code == 0
    assert "hello attach" in cri.log(pod, "cat")

    # a terminal (tty + stdin, not stdin_once): resize, then the shell sees the size
    tty = cri.run(pod, "tty", ["sh"], stdin=True, tty=True)
    url = attach_url(cri, tty, stdin=True, tty=True)
    resp, c = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    assert c is not None
    await c.open_stream({"streamtype": "error"})
    sin = await c.open_stream({"streamtype": "stdin"})
    out = await c.open_stream({"streamtype": "stdout"})
    rz = await c.open_stream({"streamtype": "resize"})
    await c.write(rz, json.dumps({"Width": 123, "Height": 45}).encode() + b"\n")
    await asyncio.sleep(0.2)
    await c.write(sin, b"stty size\n")
    await wait_for_stdout(c, out, rb"45 123")
    await c.close()
    assert cri.status(tty).state == api_pb2.CONTAINER_RUNNING
    # attaching to a container that is not running is refused up front
    with pytest.raises(grpc.RpcError) as e:
        attach_url(cri, cat)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def _connect_once(c: SpdyClient, port: int, rid: int) -> bytes:
    """One port-forward connection that only reads the error stream."""
    err = await c.open_stream({"streamtype": "error", "port": str(port), "requestid": str(rid)})
    await c.write(err, b"", fin=True)
    data = await c.open_stream({"streamtype": "data", "port": str(port), "requestid": str(rid)})
    await c.write(data, b"", fin=True)
    return await c.read_stream(err)


@pytest.mark.timeout(180)
async def test_port_forward(cri: Cri, pod: str) -> None:
    cri.run(pod, "echo", ["nc", "-ll", "-p", str(ECHO_PORT), "-e", "cat"])
    url = port_forward_url(cri, pod)
    _resp, c = await SpdyClient.connect(url, ["portforward.k8s.io"])
    assert c is not None
    # wait for the listener inside the pod's network namespace
    rid = 100
    async with asyncio.timeout(15):
        while await _connect_once(c, ECHO_PORT, rid):
            rid += 1
            await asyncio.sleep(0.1)
    payloads = [os.urandom(50_000 + i) for i in range(8)]
    got = await asyncio.gather(*(forward_one(c, ECHO_PORT, i, p) for i, p in enumerate(payloads)))
    assert got == payloads
    # a refused port: reported on that connection's error stream, the session goes on
    err = await _connect_once(c, 1, 50)
    assert err.startswith(b"error forwarding port 1 to pod "), err
    assert await forward_one(c, ECHO_PORT, 51, b"still here") == b"still here"
    await c.close()
    # the WebSocket tunnel (kube-apiserver's form) reaches the same pod
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            port_forward_url(cri, pod, [ECHO_PORT]), protocols=["v4.channel.k8s.io"]
        ) as ws,
    ):
        await ws.receive_bytes(timeout=10)  # data channel's port prefix
        await ws.receive_bytes(timeout=10)  # error channel's port prefix
        await ws.send_bytes(b"\x00ws echo")
        msg = await ws.receive_bytes(timeout=10)
        assert msg == b"\x00ws echo"


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
    await wait_for_stdout(c, out, rb"\d+\n")
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
