"""Just enough of a kube-apiserver for `kubectl exec` and `kubectl port-forward`.

It answers discovery and one pod GET, and turns the pod's exec/portforward subresource
request into a criv streaming URL (as kubelet would, through the CRI), then relays the
client's upgrade request and all following bytes to criv unchanged. So the Go client
(client-go inside kubectl) talks to criv's server byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from urllib.parse import parse_qs, urlsplit

from criv.streaming.service import StreamingService

POD = "mypod"


def _pod() -> dict[str, object]:
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": POD, "namespace": "default", "uid": "u1"},
        "spec": {
            "containers": [{"name": "c", "image": "busybox", "stdin": True, "stdinOnce": True}]
        },
        "status": {
            "phase": "Running",
            "containerStatuses": [{"name": "c", "ready": True, "containerID": "criv://c1"}],
        },
    }


RESOURCES = {
    "kind": "APIResourceList",
    "apiVersion": "v1",
    "groupVersion": "v1",
    "resources": [
        {
            "name": "pods",
            "singularName": "pod",
            "namespaced": True,
            "kind": "Pod",
            "verbs": ["get", "list"],
            "shortNames": ["po"],
        },
        {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions",
         "verbs": ["create", "get"]},
        {"name": "pods/attach", "singularName": "", "namespaced": True,
         "kind": "PodAttachOptions", "verbs": ["create", "get"]},
        {"name": "pods/portforward", "singularName": "", "namespaced": True,
         "kind": "PodPortForwardOptions", "verbs": ["create", "get"]},
    ],
}  # fmt: skip

DOCS: dict[str, object] = {
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
    "/api/v1": RESOURCES,
    "/version": {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"},
    f"/api/v1/namespaces/default/pods/{POD}": _pod(),
}


class FakeApiServer:
    def __init__(self, service: StreamingService) -> None:
        self.service = service
        self.server: asyncio.Server | None = None
        self.port = 0
        self.upgrades: list[str] = []  # the protocol headers of each relayed upgrade

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: several plain requests may share a connection
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}  # fmt: skip
                n = int(headers.get("content-length", "0"))
                if n:
                    await reader.readexactly(n)
                u = urlsplit(target)
                if u.path.endswith(("/exec", "/attach", "/portforward")):
                    await self._relay(method, u.path, parse_qs(u.query), head, reader, writer)
                    return
                doc = DOCS.get(u.path)
                status = "200 OK" if doc is not None else "404 Not Found"
                body = json.dumps(doc if doc is not None else {
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "NotFound", "code": 404}).encode()  # fmt: skip
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        finally:
            writer.close()

    async def _relay(
        self,
        method: str,
        path: str,
        q: dict[str, list[str]],
        head: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        def flag(name: str) -> bool:
            return q.get(name, ["false"])[0] in ("true", "1")

        if path.endswith("/exec"):
            url = self.service.exec_url(
                "c1", q["command"], tty=flag("tty"), stdin=flag("stdin"),
                stdout=flag("stdout"), stderr=flag("stderr"),
            )  # fmt: skip
        elif path.endswith("/attach"):
            url = self.service.attach_url(
                "c1", tty=flag("tty"), stdin=flag("stdin"), stdout=flag("stdout"),
                stderr=flag("stderr"),
            )  # fmt: skip
        else:
            url = self.service.port_forward_url("sb1")
        u = urlsplit(url)
        lines = head.decode("latin-1").split("\r\n")
        lines[0] = f"{method} {u.path} HTTP/1.1"
        self.upgrades.append(
            " ".join(
                line
                for line in lines
                if line.lower().startswith(
                    ("upgrade:", "sec-websocket-protocol:", "x-stream-protocol-version:")
                )
            )
        )
        up_r, up_w = await asyncio.open_connection(u.hostname, u.port)
        up_w.write("\r\n".join(lines).encode("latin-1"))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        up_w.close()
