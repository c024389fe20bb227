"""Image references, parsed and normalised as containerd (distribution/reference) does.

``busybox`` -> ``docker.io/library/busybox:latest``; ``host:5000/a/b:t``;
``name@sha256:<hex>``; ``name:tag@sha256:<hex>``. A bad reference is InvalidArgument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from criv.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_DOMAIN_RE = re.compile(rf"^{_DOMAIN}$")
_PATH_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_TAG_RE = re.compile(rf"^{_TAG}$")
_DIGEST_RE = re.compile(rf"^{_DIGEST}$")
_SHA256_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Reference:
    """A fully normalised reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def repository(self) -> str:
        """``docker.io/library/busybox``: the name without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def reference(self) -> str:
        """What the registry API calls the reference: the digest if any, else the tag."""
        return self.digest or self.tag

    def tagged(self) -> str | None:
        return f"{self.repository}:{self.tag}" if self.tag else None

    def with_digest(self, digest: str) -> str:
        return f"{self.repository}@{digest}"

    def __str__(self) -> str:
        s = self.repository
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def is_sha256_digest(s: str) -> bool:
    return bool(_SHA256_RE.match(s))


def is_hex_id(s: str) -> bool:
    return bool(_HEX64_RE.match(s))


def validate_digest(digest: str) -> str:
    """Check ``algo:hex``; only sha256 is supported for content."""
    if not _DIGEST_RE.match(digest):
        raise InvalidArgument(f"invalid digest {digest!r}")
    if not _SHA256_RE.match(digest):
        raise InvalidArgument(f"unsupported digest {digest!r}: only sha256 is supported")
    return digest


def _split_domain(name: str) -> tuple[str, str]:
    i = name.find("/")
    if i == -1:
        domain, rest = DEFAULT_DOMAIN, name
    else:
        first = name[:i]
        looks_like_host = "." in first or ":" in first or first == "localhost"
        if not looks_like_host and first.lower() == first:
            domain, rest = DEFAULT_DOMAIN, name
        else:
            domain, rest = first, name[i + 1 :]
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in rest:
        rest = OFFICIAL_REPO_PREFIX + rest
    return domain, rest


def parse_reference(ref: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalise ``ref``; raises InvalidArgument when it is not a reference.

    With ``default_tag`` a reference with neither tag nor digest gets ``:latest``.
    """
    if not ref or ref != ref.strip():
        raise InvalidArgument(f"invalid image reference {ref!r}")
    if _HEX64_RE.match(ref):
        raise InvalidArgument(
            f"invalid repository name ({ref}): cannot specify 64-byte hexadecimal strings"
        )
    rest = ref
    digest = ""
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        validate_digest(digest)
    tag = ""
    # A tag is after the last ':' that follows the last '/' (a ':' before is a port).
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise InvalidArgument(f"invalid tag {tag!r} in image reference {ref!r}")
    if not rest:
        raise InvalidArgument(f"invalid image reference {ref!r}: empty name")
    domain, path = _split_domain(rest)
    if not _DOMAIN_RE.match(domain):
        raise InvalidArgument(f"invalid registry host {domain!r} in image reference {ref!r}")
    if not _PATH_RE.match(path):
        if path.lower() != path:
            raise InvalidArgument(f"invalid image reference {ref!r}: repository must be lowercase")
        raise InvalidArgument(f"invalid repository name {path!r} in image reference {ref!r}")
    if len(domain) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidArgument(f"image reference {ref!r}: repository name too long")
    if default_tag and not tag and not digest:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


def normalize(ref: str) -> str:
    """The containerd normal form of ``ref`` as a string."""
    return str(parse_reference(ref))
