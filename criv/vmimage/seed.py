"""cloud-init NoCloud seeds for `vm-image` pods: ``meta-data``, ``network-config`` (v2) and
``user-data`` (#cloud-config) written to an ISO9660 image with volume id ``cidata``.

Every value is criv's own data, but it still goes through one rule: each input is checked
against what it may be (a hostname is DNS labels, an address parses, a key is one OpenSSH
public key line) and every scalar is written as a double-quoted YAML string (JSON string
syntax, which YAML accepts), so no value can add keys or documents to the YAML.

The layout is fixed (one key per line, two-space indents): the test disk's init
(images/vm-test-disk/) reads it with awk, so keep the two in step.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from criv.errors import FailedPrecondition, Internal, InvalidArgument

VOLUME_ID = "cidata"
FILES = ("meta-data", "network-config", "user-data")

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_IFNAME = re.compile(r"^[a-z][a-z0-9]{0,14}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_PUBKEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,3}( [ -~]{0,200})?$"
)


@dataclass(frozen=True)
class Route:
    to: str  # "default" or a CIDR
    via: str


@dataclass(frozen=True)
class SeedConfig:
    """What a pod's seed says; checked by :func:`validate` before anything is written."""

    instance_id: str
    hostname: str
    addresses: tuple[str, ...]  # CIDR, e.g. "10.88.0.5/16"
    ssh_public_key: str
    user: str = "root"
    gateway: str = ""
    routes: tuple[Route, ...] = ()
    dns_servers: tuple[str, ...] = ()
    dns_searches: tuple[str, ...] = ()
    mac: str = ""  # when set, the interface is matched by MAC and renamed to ``interface``
    interface: str = "eth0"


def _hostname(value: str, what: str) -> str:
    if len(value) > 253 or not _HOSTNAME.match(value):
        raise InvalidArgument(f"seed: {what} {value!r} is not a DNS name")
    return value


def _ip(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InvalidArgument(f"seed: {what} {value!r} is not an IP address") from None


def _cidr(value: str, what: str) -> str:
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise InvalidArgument(f"seed: {what} {value!r} is not ADDRESS/PREFIX") from None
    if "/" not in value:
        raise InvalidArgument(f"seed: {what} {value!r} has no prefix length")
    return str(iface)


def validate(cfg: SeedConfig) -> None:
    """Raise InvalidArgument naming the first value that cannot go in a seed."""
    if not _INSTANCE.match(cfg.instance_id):
        raise InvalidArgument(f"seed: instance id {cfg.instance_id!r} is not [A-Za-z0-9._-]+")
    _hostname(cfg.hostname, "hostname")
    if not _USER.match(cfg.user):
        raise InvalidArgument(f"seed: user {cfg.user!r} is not a POSIX user name")
    if not _PUBKEY.match(cfg.ssh_public_key):
        raise InvalidArgument("seed: the SSH public key is not one OpenSSH public key line")
    if not cfg.addresses:
        raise InvalidArgument("seed: no address for the interface")
    for a in cfg.addresses:
        _cidr(a, "address")
    if cfg.gateway:
        _ip(cfg.gateway, "gateway")
    for r in cfg.routes:
        if r.to != "default":
            try:
                ipaddress.ip_network(r.to, strict=False)
            except ValueError:
                raise InvalidArgument(f"seed: route destination {r.to!r} is not a CIDR") from None
        _ip(r.via, "route gateway")
    for s in cfg.dns_servers:
        _ip(s, "DNS server")
    for d in cfg.dns_searches:
        _hostname(d, "DNS search domain")
    if cfg.mac and not _MAC.match(cfg.mac):
        raise InvalidArgument(f"seed: MAC {cfg.mac!r} is not lower-case aa:bb:cc:dd:ee:ff")
    if not _IFNAME.match(cfg.interface):
        raise InvalidArgument(f"seed: interface name {cfg.interface!r} is not valid")


def q(value: str) -> str:
    """A double-quoted YAML scalar (JSON string syntax, ASCII only)."""
    return json.dumps(value, ensure_ascii=True)


def meta_data(cfg: SeedConfig) -> str:
    return f"instance-id: {q(cfg.instance_id)}\nlocal-hostname: {q(cfg.hostname)}\n"


def network_config(cfg: SeedConfig) -> str:
    lines = ["version: 2", "ethernets:", f"  {cfg.interface}:"]
    if cfg.mac:
        lines += [
            "    match:",
            f"      macaddress: {q(cfg.mac)}",
            f"    set-name: {q(cfg.interface)}",
        ]
    lines.append("    addresses:")
    lines += [f"      - {q(_cidr(a, 'address'))}" for a in cfg.addresses]
    routes = list(cfg.routes)
    if cfg.gateway:
        routes.insert(0, Route("default", cfg.gateway))
    if routes:
        lines.append("    routes:")
        for r in routes:
            lines += [f"      - to: {q(r.to)}", f"        via: {q(_ip(r.via, 'gateway'))}"]
    if cfg.dns_servers or cfg.dns_searches:
        lines.append("    nameservers:")
        if cfg.dns_servers:
            lines.append("      addresses:")
            lines += [f"        - {q(_ip(s, 'DNS server'))}" for s in cfg.dns_servers]
        if cfg.dns_searches:
            lines.append("      search:")
            lines += [f"        - {q(d)}" for d in cfg.dns_searches]
    return "\n".join(lines) + "\n"


def user_data(cfg: SeedConfig) -> str:
    lines = ["#cloud-config", f"hostname: {q(cfg.hostname)}", "ssh_pwauth: false"]
    key = f"  - {q(cfg.ssh_public_key)}"
    if cfg.user == "root":
        lines += ["disable_root: false", "ssh_authorized_keys:", key]
    else:
        lines += [
            "users:",
            f"  - name: {q(cfg.user)}",
            "    lock_passwd: true",
            '    sudo: "ALL=(ALL) NOPASSWD:ALL"',
            '    shell: "/bin/sh"',
            "    ssh_authorized_keys:",
            f"  {key}",
        ]
    return "\n".join(lines) + "\n"


def render(cfg: SeedConfig) -> dict[str, str]:
    """The three seed files by name (validated)."""
    validate(cfg)
    return {
        "meta-data": meta_data(cfg),
        "network-config": network_config(cfg),
        "user-data": user_data(cfg),
    }


def iso_tool() -> list[str]:
    """The mkisofs-compatible command line prefix found on this host."""
    if path := shutil.which("genisoimage"):
        return [path]
    if path := shutil.which("xorriso"):
        return [path, "-as", "mkisofs"]
    raise FailedPrecondition("no ISO9660 writer: apt-get install genisoimage (or xorriso)")


def write_iso(files: dict[str, str], out: Path) -> Path:
    """Write ``files`` (name -> text) as an ISO9660 image (Rock Ridge + Joliet) at ``out``."""
    out = out.absolute()  # the tool runs in a scratch directory
    with tempfile.TemporaryDirectory(prefix="criv-seed-") as tmp:
        names = []
        for name, text in files.items():
            if name not in FILES:
                raise InvalidArgument(f"seed: unexpected file {name!r}")
            (Path(tmp) / name).write_text(text)
            names.append(name)
        partial = out.with_name(f".{out.name}.partial")
        cmd = [*iso_tool(), "-quiet", "-output", str(partial), "-volid", VOLUME_ID]
        cmd += ["-joliet", "-rock", *names]
        try:
            r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Internal(f"seed: {cmd[0]} failed: {e}") from e
        if r.returncode != 0:
            partial.unlink(missing_ok=True)
            raise Internal(f"seed: {cmd[0]} exited {r.returncode}: {r.stderr.strip()[-500:]}")
        partial.chmod(0o644)
        partial.rename(out)
    return out


def build_seed(cfg: SeedConfig, out: Path) -> Path:
    """Validate ``cfg`` and write its NoCloud seed ISO to ``out``; return ``out``."""
    return write_iso(render(cfg), out)
