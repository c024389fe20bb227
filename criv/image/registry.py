"""Docker Registry v2 / OCI distribution client on aiohttp.

Endpoints for a registry host are its configured mirrors, in order, then the host
itself (``registry-1.docker.io`` for docker.io). Hosts listed as insecure (and
loopback hosts, as containerd does) may be reached over plain HTTP or unverified TLS.
Auth follows the registry's 401 challenge: Basic, or Bearer through the token service
named by the challenge. Manifests are read into memory (bounded) and checked against
their digest; blobs are streamed into the content store and checked there.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from criv.config import ImageLimitsConfig, RegistriesConfig
from criv.errors import DigestMismatch, ImageError, ImageNotFound, RegistryAuthError, RegistryError
from criv.image.auth import Challenge, Credentials, load_auth_file, normalize_host, parse_challenges
from criv.image.content import BlobWriter
from criv.image.limits import exceeded
from criv.image.media import ACCEPT, sha256_digest
from criv.image.reference import Reference
from criv.image.responses import Failures, error_text, read_at_most

log = logging.getLogger(__name__)

DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
_WRITE_BATCH = 1 << 20
_USER_AGENT = "criv"


@dataclass(frozen=True)
class Endpoint:
    base: str  # scheme://host[:port][/prefix], no trailing slash
    host: str  # host[:port], for messages and credentials
    verify_tls: bool
    mirror: bool

    def url(self, path: str) -> str:
        base = self.base[:-3] if self.base.endswith("/v2") else self.base
        return f"{base}/v2/{path}"

    def __str__(self) -> str:
        return f"{'mirror ' if self.mirror else 'registry '}{self.base}"


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0][1:]
    return name in ("localhost", "::1") or name.startswith("127.")


def _fingerprint(creds: Credentials) -> str:
    """Which credentials an auth header was made from: never reuse one for others."""
    if creds.is_empty():
        return ""
    fields = (creds.username, creds.password, creds.auth, creds.identity_token)
    return hashlib.sha256("\0".join((*fields, creds.registry_token)).encode()).hexdigest()


class RegistryClient:
    def __init__(self, config: RegistriesConfig, limits: ImageLimitsConfig | None = None) -> None:
        self.config = config
        self.limits = limits or ImageLimitsConfig()
        self._session: aiohttp.ClientSession | None = None
        self._auth_file = load_auth_file(config.auth_file)
        # (endpoint host, scope, credentials fingerprint) -> (Authorization, expiry)
        self._auth_cache: dict[tuple[str, str, str], tuple[str, float]] = {}
        self.blob_gets: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            headers={"User-Agent": _USER_AGENT},
            connector=aiohttp.TCPConnector(limit=32),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ImageError("registry client is not started")
        return self._session

    # -- endpoints and credentials ------------------------------------------------

    def endpoints(self, domain: str) -> list[Endpoint]:
        insecure = set(self.config.insecure)
        out: list[Endpoint] = []
        for base in self.config.mirrors.get(domain, []):
            host = urlsplit(base).netloc
            out.append(Endpoint(base.rstrip("/"), host, host not in insecure, True))
        host = DOCKER_HUB_ENDPOINT if domain == "docker.io" else domain
        if domain in insecure or host in insecure or _is_loopback(host):
            out.append(Endpoint(f"https://{host}", host, False, False))
            out.append(Endpoint(f"http://{host}", host, False, False))
        else:
            out.append(Endpoint(f"https://{host}", host, True, False))
        return out

    def _credentials(self, ep: Endpoint, ref: Reference, creds: Credentials | None) -> Credentials:
        host = normalize_host(ep.host)
        if creds is not None and not creds.is_empty():
            sa = normalize_host(creds.server_address) if creds.server_address else ""
            if not sa or sa in (host, ref.domain):
                return creds
        found = self._auth_file.get(host)
        if found is None and not ep.mirror:
            found = self._auth_file.get(ref.domain)
        return found or Credentials()

    # -- requests with auth -------------------------------------------------------

    async def _authorize(
        self, ep: Endpoint, scope: str, challenges: list[Challenge], creds: Credentials
    ) -> str:
        """Answer a 401 challenge: the Authorization header to retry with."""
        by_scheme = {c.scheme: c for c in challenges}
        if "bearer" in by_scheme:
            header, ttl = await self._fetch_token(ep, scope, by_scheme["bearer"], creds)
        elif "basic" in by_scheme:
            up = creds.user_password()
            if up is None:
                raise RegistryAuthError(
                    f"registry {ep.host}: 401 Unauthorized: credentials required (Basic auth)"
                )
            header = "Basic " + base64.b64encode(f"{up[0]}:{up[1]}".encode()).decode()
            ttl = 3600.0
        else:
            raise RegistryAuthError(
                f"registry {ep.host}: 401 Unauthorized: unsupported auth scheme "
                f"{', '.join(by_scheme) or '(none)'}"
            )
        self._auth_cache[(ep.host, scope, _fingerprint(creds))] = (header, time.monotonic() + ttl)
        return header

    async def _fetch_token(
        self, ep: Endpoint, scope: str, ch: Challenge, creds: Credentials
    ) -> tuple[str, float]:
        if creds.registry_token:
            return f"Bearer {creds.registry_token}", 300.0
        realm = ch.params.get("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise RegistryAuthError(f"registry {ep.host}: bad token realm {realm!r}")
        service = ch.params.get("service", "")
        scope = ch.params.get("scope", scope)
        # the token service is verified unless the registry or the realm's host is insecure
        ssl = ep.verify_tls and urlsplit(realm).netloc not in self.config.insecure
        up = creds.user_password()
        try:
            if creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "service": service,
                    "scope": scope,
                    "client_id": "criv",
                }
                req = self.session.post(realm, data=form, ssl=ssl)
            else:
                params = {k: v for k, v in (("service", service), ("scope", scope)) if v}
                auth = aiohttp.BasicAuth(up[0], up[1]) if up else None
                req = self.session.get(realm, params=params, auth=auth, ssl=ssl)
            async with req as resp:
                body = await read_at_most(resp, 1 << 20)
                if resp.status in (401, 403):
                    raise RegistryAuthError(
                        f"registry {ep.host}: token service {realm} refused the credentials: "
                        f"{resp.status} {resp.reason}: {error_text(body)}"
                    )
                if resp.status != 200:
                    raise RegistryError(
                        f"registry {ep.host}: token service {realm} answered "
                        f"{resp.status} {resp.reason}: {error_text(body)}"
                    )
        except (aiohttp.ClientError, TimeoutError) as e:
            raise RegistryError(f"registry {ep.host}: token service {realm}: {e}") from e
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
            ttl = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
            ttl = 60.0
        if not isinstance(token, str) or not token:
            raise RegistryError(f"registry {ep.host}: token service {realm} sent no token")
        return f"Bearer {token}", max(10.0, ttl - 5.0)

    async def _send(
        self,
        ep: Endpoint,
        path: str,
        scope: str,
        creds: Credentials,
        headers: dict[str, str],
        handle: Callable[[aiohttp.ClientResponse], Awaitable[Any]],
        what: str,
    ) -> Any:
        """GET ``path`` on ``ep``, answering one auth challenge; ``handle`` the 200."""
        cached = self._auth_cache.get((ep.host, scope, _fingerprint(creds)))
        auth_header = cached[0] if cached and cached[1] > time.monotonic() else None
        for attempt in range(2):
            h = dict(headers)
            if auth_header:
                h["Authorization"] = auth_header
            try:
                async with self.session.get(ep.url(path), headers=h, ssl=ep.verify_tls) as resp:
                    if resp.status == 401 and attempt == 0:
                        challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
                        await resp.read()
                        auth_header = await self._authorize(ep, scope, challenges, creds)
                        continue
                    if resp.status in (401, 403):
                        body = await read_at_most(resp, 1 << 16)
                        raise RegistryAuthError(
                            f"registry {ep.host}: authentication failed for {what}: "
                            f"{resp.status} {resp.reason}: {error_text(body)}"
                        )
                    if resp.status == 404:
                        body = await read_at_most(resp, 1 << 16)
                        raise ImageNotFound(
                            f"{what} not found at {ep}: {error_text(body) or '404 Not Found'}"
                        )
                    if resp.status != 200:
                        body = await read_at_most(resp, 1 << 16)
                        raise RegistryError(
                            f"{ep} answered {resp.status} {resp.reason} for {what}: "
                            f"{error_text(body)}"
                        )
                    return await handle(resp)
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
                raise RegistryError(f"{ep}: {what}: {type(e).__name__}: {e}") from e
        raise RegistryAuthError(f"registry {ep.host}: authentication failed for {what}")

    # -- manifests and blobs ------------------------------------------------------

    async def get_manifest(
        self,
        ref: Reference,
        reference: str,
        creds: Credentials | None,
        endpoints: list[Endpoint] | None = None,
    ) -> tuple[bytes, str, str, Endpoint]:
        """(body, content type, digest, endpoint) of a manifest or index, verified."""
        what = f"manifest {ref.repository}:{reference}".replace(":sha256:", "@sha256:")
        scope = f"repository:{ref.path}:pull"
        failures = Failures()
        for ep in endpoints or self.endpoints(ref.domain):
            cred = self._credentials(ep, ref, creds)

            async def read(resp: aiohttp.ClientResponse, ep: Endpoint = ep) -> tuple[bytes, str]:
                limit = self.limits.max_manifest_bytes
                n = resp.content_length
                if n is None or n <= limit:
                    body = await read_at_most(resp, limit + 1)  # never more than the limit
                    n = len(body)
                if n > limit:
                    raise exceeded(
                        f"{what} from {ep}",
                        f"{n} bytes, more than {self.limits.max_manifest_kib} KiB",
                        "max_manifest_kib",
                    )
                return body, resp.headers.get("Content-Type", "")

            try:
                body, ctype = await self._send(
                    ep, f"{ref.path}/manifests/{reference}", scope, cred,
                    {"Accept": ACCEPT}, read, what,
                )  # fmt: skip
            except ImageError as e:
                log.debug("%s: %s", ep, e)
                failures.add(e)
                continue
            digest = sha256_digest(body)
            if reference.startswith("sha256:") and digest != reference:
                failures.add(DigestMismatch(f"{what} from {ep}: content is {digest}"))
                continue
            return body, ctype, digest, ep
        failures.raise_best(what)
        raise AssertionError("unreachable")

    async def fetch_blob(
        self,
        ref: Reference,
        digest: str,
        creds: Credentials | None,
        open_writer: Callable[[], BlobWriter],
        endpoints: list[Endpoint] | None = None,
    ) -> None:
        """Stream blob ``digest`` into a new writer and commit it (verified)."""
        what = f"blob {digest} of {ref.repository}"
        scope = f"repository:{ref.path}:pull"
        failures = Failures()
        for ep in endpoints or self.endpoints(ref.domain):
            cred = self._credentials(ep, ref, creds)
            writer = await asyncio.to_thread(open_writer)

            async def stream(resp: aiohttp.ClientResponse, w: BlobWriter = writer) -> None:
                n = resp.content_length
                if w.size is not None and n is not None and n > w.size:
                    raise DigestMismatch(
                        f"{w.what}: the registry sends {n} bytes, the descriptor says {w.size}"
                    )
                # Hash and write in a worker thread, a batch of chunks at a time; the
                # writer refuses a byte past the declared size, so at most one chunk
                # more than that is read.
                batch: list[bytes] = []
                pending = 0
                async for chunk in resp.content.iter_any():
                    batch.append(chunk)
                    pending += len(chunk)
                    too_long = w.size is not None and w.written + pending > w.size
                    if pending >= _WRITE_BATCH or too_long:  # the writer raises if too long
                        await asyncio.to_thread(w.write_many, batch)
                        batch, pending = [], 0
                if batch:
                    await asyncio.to_thread(w.write_many, batch)
                await asyncio.to_thread(w.commit)

            self.blob_gets[digest] += 1
            try:
                await self._send(ep, f"{ref.path}/blobs/{digest}", scope, cred, {}, stream, what)
            except DigestMismatch as e:
                await asyncio.to_thread(writer.abort)
                raise DigestMismatch(f"{e} (from {ep})") from e
            except ImageError as e:
                await asyncio.to_thread(writer.abort)
                log.debug("%s: %s", ep, e)
                failures.add(e)
                continue
            except BaseException:
                await asyncio.to_thread(writer.abort)
                raise
            return
        failures.raise_best(what)
