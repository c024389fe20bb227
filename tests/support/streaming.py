"""Streaming through a real daemon, shared by the host-mode suite
(tests/integration/streaming/test_daemon_streaming.py) and the vm-mode one
(tests/vm/pods/test_vm_streaming.py): the CRI calls that hand out URLs, a WebSocket v5
session, and the cases both isolation modes must pass, written once so that the two
suites check the same thing.

The SPDY client is tests/support/spdy_client.py (written from the facts sheet), shared
with the streaming server's own tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.spdy_client import (
    ClientStream,
    SpdyClient,
    forward_one,
    spdy_exec,
)

BLOB = 100 << 20
ECHO_PORT = 7777
COUNTER = ["sh", "-c", "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done"]
# busybox nc: a listener that serves every connection (-ll) with its own `cat`
ECHO_SERVER = ["nc", "-ll", "-p", str(ECHO_PORT), "-e", "cat"]


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


async def wait_for_stdout(stream: ClientStream, pattern: bytes, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while not re.search(pattern, bytes(stream.data)):
            stream.got_data.clear()
            await stream.got_data.wait()


async def check_exit_codes(cri: Cri, cid: str) -> None:
    """Exit codes on the error stream: SPDY v5 (as v4) and v4, WebSocket v5."""
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


async def check_stdin(cri: Cri, cid: str) -> None:
    """stdin echoed through cat, with EOF: SPDY FIN / WebSocket v5 close message."""
    payload = os.urandom(300_000)
    r = await spdy_exec(exec_url(cri, cid, ["cat"], stdin=True), stdin=payload)
    assert r.stdout == payload and r.status["status"] == "Success"
    url = exec_url(cri, cid, ["cat"], stdin=True)
    got = await ws_session(url, [b"\x00via websocket\n", b"\xff\x00"])
    assert got[1] == b"via websocket\n" and status_of(got[3])["status"] == "Success"


async def check_tty_resize(cri: Cri, cid: str) -> None:
    """A terminal: stty size after a resize, over SPDY and WebSocket (channel 4)."""
    cmd = ["sh", "-c", "read x; stty size"]
    url = exec_url(cri, cid, cmd, tty=True, stdin=True)
    r = await spdy_exec(url, stdin=b"go\n", tty=True, stderr=False, resize=(111, 33))
    assert b"33 111" in r.stdout and r.status["status"] == "Success"
    url = exec_url(cri, cid, cmd, tty=True, stdin=True)
    resize = b"\x04" + json.dumps({"Width": 97, "Height": 21}).encode()
    got = await ws_session(url, [resize, b"\x00go\n"])
    assert b"21 97" in got[1] and status_of(got[3])["status"] == "Success"


async def check_big_stdout(cri: Cri, cid: str, size: int = BLOB) -> float:
    """``size`` bytes through stdout, hash-checked; returns the transfer's seconds."""
    cmd = ["sh", "-c", f"head -c {size} /dev/urandom > /blob; sha256sum /blob"]
    made = cri.exec(cid, cmd, timeout=120)
    assert made.exit_code == 0, made.stderr
    want = made.stdout.split()[0].decode()
    url = exec_url(cri, cid, ["cat", "/blob"], stderr=False)
    t0 = time.monotonic()
    r = await spdy_exec(url, stderr=False)
    took = time.monotonic() - t0
    assert len(r.stdout) == size and hashlib.sha256(r.stdout).hexdigest() == want
    assert r.status["status"] == "Success"
    return took


async def check_disconnect_kills(cri: Cri, cid: str) -> None:
    """A client that goes away mid-stream: its exec'd process goes with its stream."""
    url = exec_url(cri, cid, ["sh", "-c", "echo $$; exec sleep 1000"], stderr=False)
    _resp, c = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    assert c is not None
    await c.open_stream({"streamtype": "error"})
    out = await c.open_stream({"streamtype": "stdout"})
    await wait_for_stdout(out, rb"\d+\n")
    pid = int(out.data.split()[0])
    await c.close()
    async with asyncio.timeout(10):
        while cri.exec(cid, ["kill", "-0", str(pid)]).exit_code == 0:
            await asyncio.sleep(0.1)


async def check_attach_counter(cri: Cri, counter: str) -> None:
    """Whatever the counter prints from now on, in order, over SPDY and WebSocket; leaving
    an attach never stops the container."""
    resp, c = await SpdyClient.connect(attach_url(cri, counter), ["v4.channel.k8s.io"])
    assert resp.status == 101 and c is not None
    await c.open_stream({"streamtype": "error"})
    out = await c.open_stream({"streamtype": "stdout"})
    await c.open_stream({"streamtype": "stderr"})
    await wait_for_stdout(out, rb"(\d+\n){5}")
    nums = [int(x) for x in bytes(out.data).split(b"\n")[:-1]]
    assert nums == list(range(nums[0], nums[0] + len(nums)))
    await c.close()
    got = await ws_session(attach_url(cri, counter), until=lambda g: g.get(1, b"").count(b"\n") > 3)
    nums2 = [int(x) for x in got[1].split(b"\n")[:3]]
    assert nums2[0] > nums[-1] and nums2 == list(range(nums2[0], nums2[0] + 3))
    assert cri.status(counter).state == api_pb2.CONTAINER_RUNNING


async def check_attach_stdin_once(cri: Cri, pod: str, cat: str) -> None:
    """stdin to a `cat` container made with stdin_once: the session's EOF closes the
    container's stdin, so it exits 0, and what it echoed is in its CRI log."""
    r = await spdy_exec(attach_url(cri, cat, stdin=True), stdin=b"hello attach\n")
    assert r.stdout == b"hello attach\n" and r.status["status"] == "Success"
    st = await asyncio.to_thread(cri.wait_exited, cat)
    assert st.exit_code == 0
    deadline = time.monotonic() + 10  # in vm mode the log reaches the host on its own stream
    while "hello attach" not in cri.log(pod, "cat"):
        assert time.monotonic() < deadline, cri.log(pod, "cat")
        await asyncio.sleep(0.1)
    # attaching to a container that is not running is refused up front
    with pytest.raises(grpc.RpcError) as e:
        attach_url(cri, cat)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def tty_attach(
    cri: Cri, cid: str
) -> tuple[SpdyClient, ClientStream, ClientStream, ClientStream]:
    """An attach session with stdin and a tty: (client, stdin, stdout, resize); its error
    stream is opened and left unread (a tty session waits for the resize stream)."""
    _resp, c = await SpdyClient.connect(
        attach_url(cri, cid, stdin=True, tty=True), ["v4.channel.k8s.io"]
    )
    assert c is not None
    await c.open_stream({"streamtype": "error"})
    sin = await c.open_stream({"streamtype": "stdin"})
    out = await c.open_stream({"streamtype": "stdout"})
    rz = await c.open_stream({"streamtype": "resize"})
    return c, sin, out, rz


async def check_attach_tty(cri: Cri, tty: str) -> None:
    """A terminal container (tty + stdin, not stdin_once): resize, then the shell sees the
    size; leaving does not stop it."""
    c, sin, out, rz = await tty_attach(cri, tty)
    await c.write(rz, json.dumps({"Width": 123, "Height": 45}).encode() + b"\n")
    await asyncio.sleep(0.2)
    await c.write(sin, b"stty size\n")
    await wait_for_stdout(out, rb"45 123")
    await c.close()
    assert cri.status(tty).state == api_pb2.CONTAINER_RUNNING


async def connect_once(c: SpdyClient, port: int, rid: int) -> bytes:
    """One port-forward connection that only reads the error stream."""
    err = await c.open_stream({"streamtype": "error", "port": str(port), "requestid": str(rid)})
    await c.write(err, b"", fin=True)
    data = await c.open_stream({"streamtype": "data", "port": str(port), "requestid": str(rid)})
    await c.write(data, b"", fin=True)
    return await c.read_stream(err)


async def check_port_forward(cri: Cri, pod: str, listen_timeout: float = 15) -> None:
    """8 concurrent connections to the echo server (ECHO_SERVER) inside the pod, a refused
    port on its own request's error stream, then the WebSocket channel form."""
    url = port_forward_url(cri, pod)
    _resp, c = await SpdyClient.connect(url, ["portforward.k8s.io"])
    assert c is not None
    # wait for the listener inside the pod (its network namespace, or the guest)
    rid = 100
    async with asyncio.timeout(listen_timeout):
        while await connect_once(c, ECHO_PORT, rid):
            rid += 1
            await asyncio.sleep(0.1)
    payloads = [os.urandom(50_000 + i) for i in range(8)]
    got = await asyncio.gather(*(forward_one(c, ECHO_PORT, i, p) for i, p in enumerate(payloads)))
    assert got == payloads
    # a refused port: reported on that connection's error stream, the session goes on
    err = await connect_once(c, 1, 50)
    assert err.startswith(b"error forwarding port 1 to pod "), err
    # the dial happens as the pod sees 127.0.0.1: the streaming server listens on the
    # host's loopback, and the pod (own netns, or a guest) has no such listener
    host_port = urlsplit(url).port
    assert host_port is not None
    err = await connect_once(c, host_port, 52)
    assert err.startswith(f"error forwarding port {host_port} to pod ".encode()), err
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
