"""A real Docker registry (Debian's ``docker-registry``) for tests, on 127.0.0.1.

    reg = RegistryServer(tmp_dir, auth="basic")   # or None, or "token"
    reg.start()
    reg.push_image("library/busybox", "latest", busybox_image())
    ...
    reg.stop()

Storage is a directory under ``root``; auth is none, htpasswd Basic, or Bearer tokens
from a small token service run here (RS256 JWTs with an x5c header, signed by
``openssl``, trusted by the registry through ``rootcertbundle``). The registry's access
log is kept, so tests can count what clients fetched. Pushing uses the Registry HTTP
API directly (monolithic blob uploads, manifest PUT).
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.images import BuiltImage, BuiltIndex, sha256

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
TOKEN_SERVICE = "criv-test-registry"
TOKEN_ISSUER = "criv-test-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The Bearer token service: GET /token?service=&scope= with Basic credentials."""

    def __init__(self, root: Path, users: dict[str, str], anonymous_pull: bool = False) -> None:
        self.root = root
        self.users = users
        self.anonymous_pull = anonymous_pull
        self.key = root / "token.key"
        self.cert = root / "token.crt"
        self.requests: list[tuple[str, str]] = []  # (user or "", scope)
        # OAuth2 refresh tokens (CRI identity_token) -> user, for POST /token
        self.refresh_tokens: dict[str, str] = {}
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def start(self) -> None:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=criv-test-token", "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                scope = " ".join(q.get("scope", []))
                user = ""
                h = self.headers.get("Authorization", "")
                if h.startswith("Basic "):
                    u, _, p = base64.b64decode(h[6:]).decode().partition(":")
                    if outer.users.get(u) != p:
                        return self._send(401, {"details": "invalid username or password"})
                    user = u
                elif not outer.anonymous_pull:
                    return self._send(401, {"details": "authentication required"})
                outer.requests.append((user, scope))
                token = outer.token(user, scope, push=bool(user))
                self._send(200, {"token": token, "access_token": token, "expires_in": 300})

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(n).decode())
                refresh = form.get("refresh_token", [""])[0]
                user = outer.refresh_tokens.get(refresh)
                if form.get("grant_type") != ["refresh_token"] or user is None:
                    return self._send(401, {"details": "invalid refresh token"})
                scope = " ".join(form.get("scope", []))
                outer.requests.append((user, scope))
                token = outer.token(user, scope, push=True)
                self._send(200, {"access_token": token, "expires_in": 300})

            def _send(self, code: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def token(self, user: str, scope: str, push: bool) -> str:
        access = []
        for s in scope.split():
            parts = s.split(":")
            if len(parts) >= 3 and parts[0] == "repository":
                name = ":".join(parts[1:-1])
                allowed = {"pull", "push"} if push else {"pull"}
                actions = [a for a in parts[-1].split(",") if a in allowed]
                access.append({"type": "repository", "name": name, "actions": actions})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": user,
            "aud": TOKEN_SERVICE,
            "exp": now + 600,
            "nbf": now - 60,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        head, body = _b64url(json.dumps(header).encode()), _b64url(json.dumps(claims).encode())
        signing_input = f"{head}.{body}"
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class RegistryServer:
    """One ``docker-registry serve`` process on 127.0.0.1 (see module doc)."""

    def __init__(
        self,
        root: Path,
        auth: str | None = None,
        users: dict[str, str] | None = None,
        port: int = 0,
    ) -> None:
        if auth not in (None, "basic", "token"):
            raise ValueError(auth)
        self.root = root
        self.auth = auth
        self.users = users if users is not None else {"criv": "s3cret"}
        self.port = port
        self.storage = root / "storage"
        self.log_path = root / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token_server: TokenServer | None = None
        self._push_auth: dict[str, str] = {}
        self.pushed: dict[str, BuiltImage | BuiltIndex] = {}  # "repo:tag" -> what

    # -- process ------------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry part of references."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, repo: str, tag: str = "latest") -> str:
        return f"{self.host}/{repo}:{tag}"

    def mirror_config(self, domain: str = "docker.io") -> dict[str, Any]:
        """criv config overrides that mirror ``domain`` to this registry."""
        return {"registries": {"mirrors": {domain: [self.url]}, "insecure": [self.host]}}

    def start(self) -> RegistryServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        if not self.port:
            self.port = free_port()
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": "criv-test-secret"},
        }
        if self.auth == "basic":
            htpasswd = self.root / "htpasswd"
            lines = []
            for user, pw in self.users.items():
                out = subprocess.run(
                    ["htpasswd", "-Bbn", user, pw], check=True, capture_output=True, text=True
                )
                lines.append(out.stdout.strip())
            htpasswd.write_text("\n".join(lines) + "\n")
            cfg["auth"] = {"htpasswd": {"realm": "criv-test", "path": str(htpasswd)}}
        elif self.auth == "token":
            if self.token_server is None:
                self.token_server = TokenServer(self.root, self.users)
                self.token_server.start()
            cfg["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": TOKEN_SERVICE,
                    "issuer": TOKEN_ISSUER,
                    "rootcertbundle": str(self.token_server.cert),
                }
            }
        config_path = self.root / "config.yml"
        config_path.write_text(json.dumps(cfg))  # JSON is YAML
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited:\n{self.logs()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"docker-registry did not listen:\n{self.logs()}") from None
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop the registry (the storage stays; start() again serves it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self.token_server is not None:
            self.token_server.stop()
            self.token_server = None

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    # -- inspection and fault injection --------------------------------------------

    def blob_gets(self, digest: str) -> int:
        """How many GETs of blob ``digest`` the registry answered (any repository)."""
        pat = re.compile(rf'"GET /v2/[^ ]+/blobs/{re.escape(digest)} HTTP/[0-9.]+" (200|307)')
        return len(pat.findall(self.logs_full()))

    def logs_full(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def blob_path(self, digest: str) -> Path:
        """The registry's own file for a blob (to corrupt it on purpose)."""
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    # -- pushing ------------------------------------------------------------------

    def _request(
        self,
        method: str,
        url: str,
        repo: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        if url.startswith("/"):
            url = self.url + url
        for attempt in range(2):
            h = dict(headers or {})
            if repo in self._push_auth:
                h["Authorization"] = self._push_auth[repo]
            req = urllib.request.Request(url, data=data, method=method, headers=h)
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return resp.status, dict(resp.headers), resp.read()
            except urllib.error.HTTPError as e:
                body = e.read()
                if e.code == 401 and attempt == 0:
                    self._push_auth[repo] = self._login(e.headers.get("WWW-Authenticate", ""), repo)
                    continue
                return e.code, dict(e.headers), body
        raise AssertionError("unreachable")

    def _login(self, challenge: str, repo: str) -> str:
        user, pw = next(iter(self.users.items()))
        if challenge.startswith("Basic"):
            return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        q = urllib.parse.urlencode(
            {"service": params.get("service", ""), "scope": f"repository:{repo}:pull,push"}
        )
        basic = base64.b64encode(f"{user}:{pw}".encode()).decode()
        req = urllib.request.Request(
            f"{params['realm']}?{q}", headers={"Authorization": f"Basic {basic}"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            token: str = json.loads(resp.read())["token"]
            return "Bearer " + token

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        code, _, _ = self._request("HEAD", f"/v2/{repo}/blobs/{digest}", repo)
        if code == 200:
            return digest
        code, headers, body = self._request("POST", f"/v2/{repo}/blobs/uploads/", repo, b"")
        if code != 202:
            raise RuntimeError(f"blob upload start: {code} {body!r}")
        loc = headers["Location"]
        sep = "&" if "?" in loc else "?"
        code, _, body = self._request(
            "PUT",
            f"{loc}{sep}digest={digest}",
            repo,
            data,
            {"Content-Type": "application/octet-stream"},
        )
        if code != 201:
            raise RuntimeError(f"blob upload of {digest}: {code} {body!r}")
        return digest

    def push_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        code, _, resp = self._request(
            "PUT", f"/v2/{repo}/manifests/{reference}", repo, body, {"Content-Type": media_type}
        )
        if code != 201:
            raise RuntimeError(f"manifest push {repo}:{reference}: {code} {resp!r}")
        return sha256(body)

    def push_image(self, repo: str, tag: str | None, image: BuiltImage) -> str:
        """Push blobs and manifest; returns the manifest digest."""
        for layer in image.layers:
            self.push_blob(repo, layer.blob)
        self.push_blob(repo, image.config)
        if tag:
            self.pushed[f"{repo}:{tag}"] = image
        return self.push_manifest(
            repo, tag or image.manifest_digest, image.manifest, image.manifest_media_type
        )

    def push_index(self, repo: str, tag: str, index: BuiltIndex) -> str:
        for img in index.images:
            self.push_image(repo, None, img)
        self.pushed[f"{repo}:{tag}"] = index
        return self.push_manifest(repo, tag, index.body, index.media_type)

    def delete_manifest(self, repo: str, digest: str) -> None:
        self._request("DELETE", f"/v2/{repo}/manifests/{digest}", repo)


class FaultProxy:
    """An HTTP proxy in front of a registry that can break blob downloads.

    ``truncate_blobs``: blob responses announce their full length, send half the body,
    then drop the connection (a registry dying mid-pull). ``corrupt_blobs``: blob bodies
    are sent with one byte flipped. ``only`` limits the faults to some digests.
    Everything else is passed through. Point a mirror (``proxy.url``) at it.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.truncate_blobs = False
        self.corrupt_blobs = False
        self.only: set[str] | None = None  # fault only these digests (None: all blobs)
        self.blob_requests: list[str] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._proxy(head=True)

            def do_GET(self) -> None:
                self._proxy(head=False)

            def _proxy(self, head: bool) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                req = urllib.request.Request(
                    outer.upstream + self.path, headers=headers, method=self.command
                )
                try:
                    resp = urllib.request.urlopen(req, timeout=60)
                    code, rh, body = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as e:
                    code, rh, body = e.code, e.headers, e.read()
                is_blob = "/blobs/sha256:" in self.path and code == 200 and not head
                if is_blob:
                    outer.blob_requests.append(self.path)
                    digest = self.path.rsplit("/", 1)[1]
                    is_blob = outer.only is None or digest in outer.only
                self.send_response(code)
                for k, v in rh.items():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if head:
                    return
                if is_blob and outer.truncate_blobs:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if is_blob and outer.corrupt_blobs and body:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
