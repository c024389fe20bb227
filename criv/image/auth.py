"""Registry credentials: the CRI AuthConfig, docker's config.json ``auths``, and the
WWW-Authenticate challenges (Basic, Bearer) a registry answers with."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    """What a client may hand us for one registry (CRI AuthConfig's fields)."""

    username: str = ""
    password: str = ""
    auth: str = ""  # base64("user:password")
    server_address: str = ""
    identity_token: str = ""  # OAuth2 refresh token for the token service
    registry_token: str = ""  # a bearer token to send as is

    def __repr__(self) -> str:  # never log secrets
        return f"Credentials(username={self.username!r}, server_address={self.server_address!r})"

    def is_empty(self) -> bool:
        return not (
            self.username
            or self.password
            or self.auth
            or self.identity_token
            or self.registry_token
        )

    def user_password(self) -> tuple[str, str] | None:
        if self.auth:
            try:
                raw = base64.b64decode(self.auth, validate=False).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            user, sep, pw = raw.partition(":")
            return (user, pw) if sep else None
        if self.username:
            return self.username, self.password
        return None


def normalize_host(s: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``host:5000/`` -> ``host:5000``."""
    s = s.strip()
    if "://" in s:
        s = s.split("://", 1)[1]
    s = s.split("/", 1)[0].lower()
    return "docker.io" if s in DOCKER_HUB_ALIASES else s


def load_auth_file(path: str) -> dict[str, Credentials]:
    """docker config.json ``auths`` by normalised host; a missing file means none."""
    if not path:
        return {}
    try:
        doc = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("registries.auth_file %s unreadable: %s", path, e)
        return {}
    auths = doc.get("auths") if isinstance(doc, dict) else None
    out: dict[str, Credentials] = {}
    if not isinstance(auths, dict):
        return out
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue

        def s(name: str, e: dict[str, object] = entry) -> str:
            v = e.get(name, "")
            return v if isinstance(v, str) else ""

        out[normalize_host(key)] = Credentials(
            username=s("username"),
            password=s("password"),
            auth=s("auth"),
            server_address=key,
            identity_token=s("identitytoken"),
            registry_token=s("registrytoken"),
        )
    return out


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic" or "bearer"
    params: dict[str, str]


_CHALLENGE_RE = re.compile(
    r"(?:^|,)\s*([A-Za-z]+)\s+"
    r"((?:[^,\"]|\"(?:[^\"\\]|\\.)*\"|,(?!\s*[A-Za-z]+\s+[A-Za-z0-9_.-]+\s*=))*)"
)
_PARAM_RE = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate header (one or more challenges)."""
    out: list[Challenge] = []
    # split before each scheme token that is followed by a space and a param
    for m in _CHALLENGE_RE.finditer(header):
        scheme, rest = m.group(1), m.group(2)
        params = {
            pm.group(1).lower(): (pm.group(2) if pm.group(2) is not None else pm.group(3) or "")
            for pm in _PARAM_RE.finditer(rest)
        }
        out.append(Challenge(scheme.lower(), params))
    if not out and header.strip():
        out.append(Challenge(header.strip().split()[0].lower(), {}))
    return out
