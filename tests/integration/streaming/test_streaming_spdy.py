"""Exec, attach, tokens and negotiation over SPDY/3.1, with the facts-sheet test client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
from streaming_support import Stack

from criv.streaming import server as server_mod
from tests.support.spdy_client import SpdyClient, control, data_frame, http_request, spdy_exec

pytestmark = pytest.mark.integration

ALL = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
]


@pytest.mark.timeout(30)
async def test_exec_hello_success_and_ending_order(stack: Stack) -> None:
    url = stack.service.exec_url("c1", ["sh", "-c", "echo hello"])
    assert url.startswith(stack.server.base_url + "/exec/")
    r = await spdy_exec(url, protocols=["v4.channel.k8s.io", "v3.channel.k8s.io"])
    assert r.protocol == "v4.channel.k8s.io"
    assert (r.stdout, r.stderr) == (b"hello\n", b"")
    assert r.error == b'{"metadata":{},"status":"Success"}'
    frames = r.client.frames
    # error=1, stdout=3, stderr=5: output FINs, then status then its FIN, then GOAWAY.
    fins = [f[1] for f in frames if f[0] == "data" and f[2] & 1]
    assert fins[:2] == [3, 5] or fins[:2] == [5, 3]
    assert fins[2] == 1
    assert frames[-1] == ("goaway", 5, 0)


@pytest.mark.timeout(30)
async def test_exec_exit_code_on_error_stream(stack: Stack) -> None:
    url = stack.service.exec_url("c1", ["sh", "-c", "echo oops >&2; exit 7"])
    r = await spdy_exec(url, protocols=ALL)
    assert r.protocol == "v5.channel.k8s.io"  # the client's first choice wins
    assert r.stderr == b"oops\n"
    st = r.status
    assert st["status"] == "Failure" and st["reason"] == "NonZeroExitCode"
    assert st["details"] == {"causes": [{"reason": "ExitCode", "message": "7"}]}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("version", ["v3.channel.k8s.io", "v2.channel.k8s.io"])
async def test_exec_old_versions_report_text(stack: Stack, version: str) -> None:
    url = stack.service.exec_url("c1", ["sh", "-c", "exit 3"])
    r = await spdy_exec(url, protocols=[version])
    assert r.protocol == version
    assert r.error.startswith(b"command terminated with non-zero exit code:")
    url = stack.service.exec_url("c1", ["true"])
    assert (await spdy_exec(url, protocols=[version])).error == b""


@pytest.mark.timeout(30)
async def test_exec_v1_runs(stack: Stack) -> None:
    url = stack.service.exec_url("c1", ["echo", "v1"])
    r = await spdy_exec(url, protocols=["channel.k8s.io"])
    assert r.protocol == "channel.k8s.io" and r.stdout == b"v1\n"


@pytest.mark.timeout(30)
async def test_exec_stdin_echoed_through_cat(stack: Stack) -> None:
    url = stack.service.exec_url("c1", ["cat"], stdin=True)
    payload = os.urandom(300_000)
    r = await spdy_exec(url, stdin=payload)
    assert r.stdout == payload
    assert r.status == {"metadata": {}, "status": "Success"}


@pytest.mark.timeout(30)
async def test_exec_tty_resize(stack: Stack) -> None:
    url = stack.service.exec_url(
        "c1", ["sh", "-c", "read x; stty size"], tty=True, stdin=True, stderr=False
    )
    r = await spdy_exec(url, stdin=b"go\n", tty=True, stderr=False, resize=(123, 45))
    assert b"45 123" in r.stdout
    assert r.status["status"] == "Success"


@pytest.mark.timeout(60)
async def test_exec_100mib_stdout_intact(stack: Stack, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    with blob.open("wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    want = hashlib.sha256(blob.read_bytes()).hexdigest()
    url = stack.service.exec_url("c1", ["cat", str(blob)], stderr=False)
    r = await spdy_exec(url, stderr=False)
    assert len(r.stdout) == 100 << 20
    assert hashlib.sha256(r.stdout).hexdigest() == want
    assert r.status["status"] == "Success"


@pytest.mark.timeout(30)
async def test_attach_to_counter(stack: Stack) -> None:
    script = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done"
    await stack.backend.create_container("ctr", ["sh", "-c", script])
    url = stack.service.attach_url("ctr", stderr=False)
    resp, c = await SpdyClient.connect(url, ALL)
    assert resp.status == 101 and c is not None
    await c.open_stream({"streamtype": "error"})
    out = await c.open_stream({"streamtype": "stdout"})
    async with asyncio.timeout(10):
        while out.data.count(b"\n") < 5:
            out.got_data.clear()
            await out.got_data.wait()
    nums = [int(x) for x in out.data.split(b"\n")[:5]]
    assert nums == list(range(nums[0], nums[0] + 5))
    await c.close()


@pytest.mark.timeout(30)
async def test_attach_stdin_once_ends_session(stack: Stack) -> None:
    await stack.backend.create_container("sh1", ["sh"], stdin=True, stdin_once=True)
    url = stack.service.attach_url("sh1", stdin=True)
    r = await spdy_exec(url, stdin=b"echo hello\n")
    assert r.stdout == b"hello\n"
    assert r.status["status"] == "Success"


@pytest.mark.timeout(30)
async def test_client_disconnect_kills_the_process(stack: Stack, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    url = stack.service.exec_url("c1", ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 1000"])
    _resp, c = await SpdyClient.connect(url, ALL)
    assert c is not None
    await c.open_stream({"streamtype": "error"})
    await c.open_stream({"streamtype": "stdout"})
    await c.open_stream({"streamtype": "stderr"})
    async with asyncio.timeout(5):
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.05)
    pid = int(pidfile.read_text())
    await c.close()
    async with asyncio.timeout(5):
        while Path(f"/proc/{pid}").exists():
            await asyncio.sleep(0.05)


@pytest.mark.timeout(30)
async def test_tokens_bad_reused_wrong_route_expired(stack: Stack) -> None:
    base = stack.server.base_url
    resp, _ = await SpdyClient.connect(f"{base}/exec/AAAAAAAA", ALL)
    assert resp.status == 404 and resp.body == b"404 page not found\n"
    url = stack.service.exec_url("c1", ["true"])
    await spdy_exec(url)
    resp, _ = await SpdyClient.connect(url, ALL)
    assert resp.status == 404  # reused
    url = stack.service.exec_url("c1", ["true"])
    resp, _ = await SpdyClient.connect(url.replace("/exec/", "/attach/"), ALL)
    assert resp.status == 404  # wrong route, and the token is now spent
    resp, _ = await SpdyClient.connect(url, ALL)
    assert resp.status == 404
    clock = [0.0]
    stack.server.tokens._clock = lambda: clock[0]
    url = stack.service.exec_url("c1", ["true"])
    clock[0] += 61
    resp, _ = await SpdyClient.connect(url, ALL)
    assert resp.status == 404
    resp, _r, w = await http_request(f"{base}/exec/{url.rsplit('/', 1)[1]}", "GET", [])
    assert resp.status == 404
    w.close()


@pytest.mark.timeout(30)
async def test_negotiation_refusals(stack: Stack) -> None:
    url = stack.service.exec_url("c1", ["true"])
    resp, _ = await SpdyClient.connect(url, ["v9.channel.k8s.io"])
    assert resp.status == 403
    assert set(resp.get_all("X-Accepted-Stream-Protocol-Versions")) == set(ALL)
    assert b"unable to negotiate protocol" in resp.body
    url = stack.service.exec_url("c1", ["true"])
    resp, _ = await SpdyClient.connect(url, [])
    assert resp.status == 400
    url = stack.service.port_forward_url("s1")
    resp, _ = await SpdyClient.connect(url, ["v4.channel.k8s.io"])
    assert resp.status == 403
    # One header line with a comma list is split like several lines.
    url = stack.service.exec_url("c1", ["true"])
    resp, c = await SpdyClient.connect(url, ["bogus, v3.channel.k8s.io ,v4.channel.k8s.io"])
    assert resp.status == 101 and resp.get("X-Stream-Protocol-Version") == "v3.channel.k8s.io"
    assert c is not None
    await c.close()


@pytest.mark.timeout(30)
async def test_nothing_after_101_pings_settings_and_partial_streams(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_mod, "STREAM_CREATION_TIMEOUT", 1.0)
    url = stack.service.exec_url("c1", ["true"])
    resp, c = await SpdyClient.connect(url, ALL)
    assert resp.status == 101 and c is not None
    await asyncio.sleep(0.3)
    assert c.frames == [] and not c.pong_event.is_set()  # the server speaks only when spoken to
    c.send(control(4, 0, struct.pack("!III", 1, 7, 65536)))  # SETTINGS: ignored
    c.send(control(9, 0, struct.pack("!II", 1, 65536)))  # WINDOW_UPDATE: ignored
    for pid in (1, 3, 5):
        await c.ping(pid)
    async with asyncio.timeout(5):
        while len(c.pongs) < 3:
            c.pong_event.clear()
            await c.pong_event.wait()
    assert c.pongs == [1, 3, 5]
    await c.open_stream({"streamtype": "error"})  # but never stdout/stderr
    async with asyncio.timeout(5):
        await c.closed.wait()  # the server gave up and closed
    assert c.goaway is not None


@pytest.mark.timeout(30)
async def test_client_goaway_early_cleans_up(stack: Stack) -> None:
    url = stack.service.exec_url("c1", ["sleep", "1000"])
    _resp, c = await SpdyClient.connect(url, ALL)
    assert c is not None
    await c.open_stream({"streamtype": "error"})
    await c.open_stream({"streamtype": "stdout"})
    await c.open_stream({"streamtype": "stderr"})
    await asyncio.sleep(0.2)
    c.send(control(7, 0, struct.pack("!II", 0, 0)))
    async with asyncio.timeout(5):
        await c.closed.wait()
    await c.close()


@pytest.mark.timeout(30)
async def test_data_for_unknown_stream_is_ignored(stack: Stack) -> None:
    url = stack.service.exec_url("c1", ["echo", "ok"], stderr=False)
    _resp, c = await SpdyClient.connect(url, ALL)
    assert c is not None
    c.send(data_frame(99, b"junk"))
    err = await c.open_stream({"streamtype": "error"})
    out = await c.open_stream({"streamtype": "stdout"})
    assert await c.read_stream(out) == b"ok\n"
    assert json.loads(await c.read_stream(err))["status"] == "Success"
    await c.close()
