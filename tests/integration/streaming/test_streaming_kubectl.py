"""Real Go clients: kubectl (client-go) exec and port-forward against criv's server.

kubectl reaches criv through a fake apiserver that relays the upgrade unchanged, so
this checks SPDY, WebSocket v5 and the port-forward tunnel against client-go itself.
Skipped where no kubectl binary is installed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fake_apiserver import POD, FakeApiServer
from streaming_support import EchoServer, Stack, free_port

pytestmark = pytest.mark.integration

SDK = Path("/usr/lib/google-cloud-sdk/bin")


def _kubectl(version: str) -> str | None:
    path = SDK / f"kubectl.{version}"
    return str(path) if path.exists() else None


KUBECTL = _kubectl("1.33") or shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary")


@pytest.fixture
async def api(stack: Stack, tmp_path: Path) -> AsyncIterator[tuple[FakeApiServer, dict[str, str]]]:
    server = FakeApiServer(stack.service)
    await server.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{server.port}"}}}}]
users: [{{name: u, user: {{}}}}]
contexts: [{{name: c, context: {{cluster: c, user: u, namespace: default}}}}]
current-context: c
"""
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "KUBECONFIG": str(kubeconfig),
    }
    try:
        yield server, env
    finally:
        await server.stop()


async def run(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode is not None
    return proc.returncode, out


@needs_kubectl
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("binary", "websocket"),
    [(KUBECTL, True), (KUBECTL, False), (_kubectl("1.27"), False)],
    ids=["websocket-v5", "spdy", "kubectl-1.27-spdy-v4"],
)
async def test_kubectl_exec(
    api: tuple[FakeApiServer, dict[str, str]], binary: str | None, websocket: bool
) -> None:
    if binary is None:
        pytest.skip("this kubectl version is not installed")
    server, env = api
    env = {**env, "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "true" if websocket else "false"}
    rc, out = await run([binary, "exec", POD, "--", "sh", "-c", "echo hello; exit 7"], env)
    assert rc == 7, out
    assert b"hello\n" in out and b"command terminated with exit code 7" in out
    rc, out = await run([binary, "exec", "-i", POD, "--", "cat"], env, stdin=b"round trip\n")
    assert (rc, out) == (0, b"round trip\n")
    want = "websocket" if websocket else "SPDY/3.1"
    assert all(want.lower() in u.lower() for u in server.upgrades), server.upgrades


@needs_kubectl
@pytest.mark.timeout(60)
@pytest.mark.parametrize("websocket", [True, False], ids=["tunnel", "spdy"])
async def test_kubectl_port_forward(
    api: tuple[FakeApiServer, dict[str, str]], echo_server: EchoServer, websocket: bool
) -> None:
    server, env = api
    assert KUBECTL is not None
    env = {**env, "KUBECTL_PORT_FORWARD_WEBSOCKETS": "true" if websocket else "false"}
    local = free_port()
    proc = await asyncio.create_subprocess_exec(
        KUBECTL, "port-forward", f"pod/{POD}", f"{local}:{echo_server.port}",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"Forwarding from" in line, line

        async def one(i: int) -> bytes:
            r, w = await asyncio.open_connection("127.0.0.1", local)
            payload = os.urandom(30_000 + i)
            w.write(payload)
            await w.drain()
            got = await r.readexactly(len(payload))
            w.close()
            assert got == payload
            return got

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), 20)
        assert proc.returncode is None  # the session survives all connections
    finally:
        proc.terminate()
        await proc.wait()
    want = "SPDY/3.1+portforward.k8s.io" if websocket else "portforward.k8s.io"
    assert all(want in u for u in server.upgrades), server.upgrades


@needs_kubectl
@pytest.mark.timeout(60)
@pytest.mark.parametrize("websocket", [True, False], ids=["websocket-v5", "spdy"])
async def test_kubectl_attach_stdin_once(
    api: tuple[FakeApiServer, dict[str, str]], stack: Stack, websocket: bool
) -> None:
    _, env = api
    assert KUBECTL is not None
    env = {**env, "KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "true" if websocket else "false"}
    await stack.backend.create_container("c1", ["sh"], stdin=True, stdin_once=True)
    rc, out = await run([KUBECTL, "attach", "-i", POD, "-c", "c"], env, stdin=b"echo hello\n")
    assert rc == 0, out
    assert b"hello\n" in out
