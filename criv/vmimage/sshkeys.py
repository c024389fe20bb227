"""Keys for the SSH sessions of `vm-image` pods.

- The **pod key**: an ed25519 key pair criv generates per pod. The private half stays in
  a directory criv owns (0700, the key file 0600, OpenSSH format); the public half is one
  OpenSSH ``authorized_keys`` line for the seed's ``ssh_authorized_keys``.
- The **host key pin**: the guest's SSH host key as criv first learnt it (its type and
  SHA256 fingerprint). Every later connection must present that key, so a guest cannot
  swap keys after the first pin. A pin comes from the seed (criv generated the host key:
  :func:`generate_host_key`, no trust on first use) or from the console at first boot
  (:func:`pin_from_console`).

Console lines that carry a host key (each searched within one line of at most
``MAX_LINE`` bytes, in the first ``MAX_CONSOLE_SCAN`` bytes of the console):

- criv's own line, printed by an image's init: ``criv-hostkey: <what follows>``, where
  what follows is any of the forms below; where any such line exists, only those count;
- a type and fingerprint: ``ssh-ed25519 SHA256:<43 base64 chars>``;
- what ``ssh-keygen -l -f KEY.pub`` prints: ``256 SHA256:<fp> comment (ED25519)``
  (as cloud-init prints between its ``BEGIN SSH HOST KEY FINGERPRINTS`` markers);
- a public key line: ``ssh-ed25519 AAAA... [comment]`` (cloud-init's ``BEGIN SSH HOST KEY
  KEYS`` block, dropbear's "Public key portion is:").

MD5 fingerprints are not accepted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from criv.errors import FailedPrecondition, HostKeyMismatch, InvalidArgument

KEY_FILE = "id_ed25519"
MAX_CONSOLE_SCAN = 1 << 20
MAX_LINE = 4096
MAX_KEY_BLOB = 8192  # an RSA-16384 public key blob is ~2 KiB
CRIV_LINE_PREFIX = "criv-hostkey:"

KEY_TYPES = (
    "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa",
)  # fmt: skip
_TYPE_RE = r"ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)"
_FP_RE = r"SHA256:([A-Za-z0-9+/]{43})=?"
_COMMENT = re.compile(r"^[A-Za-z0-9._@+:-]{1,64}$")
_CRIV = re.compile(re.escape(CRIV_LINE_PREFIX) + r"\s*(.*)$")
_TYPED_FP = re.compile(rf"(?:^|\s)({_TYPE_RE})\s+{_FP_RE}(?:\s|$)")
_PUBKEY = re.compile(
    rf"(?:^|\s)({_TYPE_RE})\s+(AAAA[A-Za-z0-9+/]{{8,{MAX_KEY_BLOB * 2}}}={{0,3}})(?:\s|$)"
)
_KEYGEN = re.compile(rf"(?:^|\s)(\d{{3,5}})\s+{_FP_RE}\s(?:.*\s)?\(([A-Z0-9-]{{2,16}})\)\s*$")


# ---- the pod key ----


@dataclass(frozen=True)
class PodKey:
    path: Path  # the private key, OpenSSH format, 0600
    public_line: str  # "ssh-ed25519 AAAA... comment", for ssh_authorized_keys

    def load(self) -> paramiko.PKey:
        try:
            return paramiko.Ed25519Key.from_private_key_file(str(self.path))
        except (OSError, paramiko.SSHException) as e:
            raise FailedPrecondition(f"pod SSH key {self.path}: {e}") from e


def ensure_pod_key(directory: Path, comment: str) -> PodKey:
    """The pod key in ``directory``: loaded if there, else generated. ``directory`` is
    created 0700 (a directory criv owns: not a link, owned by criv's user)."""
    if not _COMMENT.match(comment):
        raise InvalidArgument(f"SSH key comment {comment!r}: 1-64 of [A-Za-z0-9._@+:-]")
    _own_dir(directory)
    path = directory / KEY_FILE
    key = _load_private(path)
    if key is None:
        new = ed25519.Ed25519PrivateKey.generate()
        pem = new.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        # a concurrent caller that wrote first wins: both return its key
        key = new if _write_private(path, pem) else _load_private(path)
        if key is None:
            raise FailedPrecondition(f"pod SSH key {path}: vanished while written")
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return PodKey(path, f"{pub.decode()} {comment}")


def _load_private(path: Path) -> ed25519.Ed25519PrivateKey | None:
    try:
        data = _read_private(path)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: a link where the key should be
        raise FailedPrecondition(f"pod SSH key {path}: {e.strerror}") from e
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise FailedPrecondition(f"pod SSH key {path}: unreadable ({e})") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise FailedPrecondition(f"pod SSH key {path}: not an ed25519 key")
    return key


def _own_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise FailedPrecondition(f"SSH key directory {directory}: not a directory criv owns")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)


def _read_private(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 * 1024:
            raise FailedPrecondition(f"pod SSH key {path}: not a small regular file")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(f.fileno(), 0o600)
        return f.read()


def _write_private(path: Path, data: bytes) -> bool:
    """Write the key file whole (fsync'd) where none is; False where one already is."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


# ---- host keys ----


def fingerprint(blob: bytes) -> str:
    """SHA256 fingerprint of a public key blob, as ``ssh-keygen -l`` prints it (unpadded
    base64, without the ``SHA256:`` prefix)."""
    return base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def blob_key_type(blob: bytes) -> str:
    """The key type named at the start of an SSH public key blob ('' if malformed)."""
    if len(blob) < 4:
        return ""
    n = int.from_bytes(blob[:4], "big")
    if n > 64 or len(blob) < 4 + n:
        return ""
    return blob[4 : 4 + n].decode("ascii", errors="replace")


@dataclass(frozen=True)
class HostKeyPin:
    key_type: str  # "ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"
    sha256: str  # unpadded base64, as after "SHA256:" in ssh-keygen -l

    def __str__(self) -> str:
        return f"{self.key_type} SHA256:{self.sha256}"

    def matches(self, blob: bytes) -> bool:
        return blob_key_type(blob) == self.key_type and fingerprint(blob) == self.sha256

    def check(self, key: paramiko.PKey, where: str) -> None:
        """Raise :class:`HostKeyMismatch` unless ``key`` is the pinned key."""
        blob = key.asbytes()
        if not self.matches(blob):
            raise HostKeyMismatch(
                f"ssh {where}: host key {blob_key_type(blob)} SHA256:{fingerprint(blob)}"
                f" is not the pinned {self}; refusing to connect (the guest changed its"
                " host key, or this is not the pod's VM)"
            )

    @classmethod
    def from_blob(cls, blob: bytes) -> HostKeyPin:
        kind = blob_key_type(blob)
        if kind not in KEY_TYPES:
            raise InvalidArgument(f"host key: unsupported key type {kind!r}")
        return cls(kind, fingerprint(blob))

    @classmethod
    def parse(cls, text: str) -> HostKeyPin:
        """A pin from one line in any form the module docstring lists (the
        ``criv-hostkey:`` prefix is optional here). Raises InvalidArgument."""
        pin = _parse_line(text[:MAX_LINE].strip())
        if pin is None:
            raise InvalidArgument(f"host key pin {text[:100]!r}: not a host key line")
        return pin


def _parse_line(line: str) -> HostKeyPin | None:
    m = _CRIV.search(line)
    if m:
        line = m.group(1)
    m = _TYPED_FP.search(line)
    if m:
        return HostKeyPin(m.group(1), m.group(2))
    m = _KEYGEN.search(line)
    if m:
        return _keygen_pin(int(m.group(1)), m.group(2), m.group(3))
    m = _PUBKEY.search(line)
    if m:
        try:
            blob = base64.b64decode(m.group(2), validate=True)
        except (binascii.Error, ValueError):
            return None
        if blob_key_type(blob) != m.group(1):
            return None
        return HostKeyPin(m.group(1), fingerprint(blob))
    return None


def _keygen_pin(bits: int, fp: str, label: str) -> HostKeyPin | None:
    if label == "ED25519":
        return HostKeyPin("ssh-ed25519", fp)
    if label == "RSA":
        return HostKeyPin("ssh-rsa", fp)
    if label == "ECDSA" and bits in (256, 384, 521):
        return HostKeyPin(f"ecdsa-sha2-nistp{bits}", fp)
    return None  # DSA, security keys: not host keys criv accepts


def find_host_key_pins(console: bytes, limit: int = MAX_CONSOLE_SCAN) -> list[HostKeyPin]:
    """Every distinct host key named on the console, in order of first appearance.
    Only the first ``limit`` bytes are read; a longer line counts by its first
    ``MAX_LINE`` bytes. Where ``criv-hostkey:`` lines exist, only those count."""
    ours: list[HostKeyPin] = []
    others: list[HostKeyPin] = []
    for raw in console[:limit].split(b"\n"):
        line = raw[:MAX_LINE].decode("ascii", errors="replace").replace("\r", "")
        pin = _parse_line(line)
        if pin is None:
            continue
        found = ours if CRIV_LINE_PREFIX in line else others
        if pin not in found:
            found.append(pin)
    return ours or others


def pin_from_console(console: bytes, limit: int = MAX_CONSOLE_SCAN) -> HostKeyPin | None:
    """The pin to keep from a first boot's console: the ed25519 key if named, else ECDSA,
    else RSA; None when the console names none. Two different keys of the chosen type
    are refused (HostKeyMismatch): criv cannot tell which one the SSH server holds."""
    pins = find_host_key_pins(console, limit)
    for kind in KEY_TYPES:
        of_kind = [p for p in pins if p.key_type == kind]
        if len(of_kind) > 1:
            raise HostKeyMismatch(
                f"console names {len(of_kind)} different {kind} host keys: "
                + ", ".join(str(p) for p in of_kind[:4])
            )
        if of_kind:
            return of_kind[0]
    return None


@dataclass(frozen=True)
class HostKeyMaterial:
    """A host key criv generates for a guest (cloud-init ``ssh_keys``: ``ed25519_private``
    and ``ed25519_public``), so the pin is known before the first boot."""

    private_openssh: str
    public_line: str
    pin: HostKeyPin


def generate_host_key() -> HostKeyMaterial:
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    blob = base64.b64decode(pub.split()[1])
    return HostKeyMaterial(priv, pub.decode(), HostKeyPin.from_blob(blob))
