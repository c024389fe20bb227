"""What a vm-image pod's in-process agent knows of its container, on disk, so that a
restarted criv can take the pod back (:mod:`.adopt`).

One record per pod, ``<pod state>/vmimage/agent.json``, in criv's record envelope
(:mod:`criv.state.records`: ``{"version", "kind", "data"}``, written atomically: write,
fsync, rename, fsync the directory). Written when the pod boots (no container yet), on
every state change of its container (:mod:`.boxstate`) and, while the VM runs, every
:data:`~.console.MARK_INTERVAL` seconds with the console's mark (how far the console was
copied into the CRI log); removed when the pod's VM is destroyed.

Read back, it is data, not truth: at most :data:`MAX_RECORD_BYTES`, a regular file (no
link followed), a version no newer than :data:`VERSION`, and every field checked (type,
range, pattern) before use, since some came from the guest (the host key pin, the console
tail in the message) and some name files. No path is stored: the container's files are
found from the pod and container ids (:func:`.container.box_paths`), its base disk by a
name of the form criv gives it (``<32 hex>.<qcow2|raw>``) under ``<state_dir>/vmimage/
bases``. Any check that fails is :class:`RecordInvalid`: the pod is not re-adopted.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from criv.errors import Internal
from criv.sandbox.vmimage.boxstate import VM_STATES, BoxState
from criv.state.records import write_record
from criv.vmimage.firmware import Firmware

if TYPE_CHECKING:  # the SSH layer (paramiko) is loaded when a pin is read: see isolation.py
    from criv.vmimage.sshkeys import HostKeyPin

KIND = "vm-image-agent"
# 2: the container's firmware ("bios" or "uefi"); a version 1 record's is "bios"
VERSION = 2
FILE_NAME = "agent.json"
MAX_RECORD_BYTES = 256 * 1024
MAX_MESSAGE = 16 * 1024  # characters; a longer message is cut when written
MAX_OFFSET = 1 << 50
MAX_NS = (1 << 63) - 1

_ID = re.compile(r"[0-9a-f]{64}")
_BASE = re.compile(r"[0-9a-f]{32}\.(qcow2|raw)")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")  # as the seed's (criv.vmimage.seed)
_REASON = re.compile(r"[A-Za-z]{0,64}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_FINGERPRINT = re.compile(r"[A-Za-z0-9+/]{43}")


class RecordInvalid(Internal):
    """The record is missing, unreadable or fails a check: it cannot be trusted."""


@dataclass(frozen=True)
class ConsoleMark:
    """How far the console was copied: ``offset`` bytes of ``console.log`` are in the CRI
    log as whole records, which then took ``log_size`` bytes."""

    offset: int = 0
    log_size: int = 0


@dataclass(frozen=True)
class BoxRecord:
    cid: str
    state: BoxState
    base: str  # the base disk's file name under <state_dir>/vmimage/bases
    disk_name: str  # its name under the image's /disk/ (commit names the result after it)
    user: str
    created_at_ns: int
    firmware: Firmware = "bios"
    started_at_ns: int = 0
    finished_at_ns: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    domain_uuid: str = ""
    pin: HostKeyPin | None = None
    mark: ConsoleMark = ConsoleMark()

    @property
    def base_format(self) -> str:
        return self.base.rsplit(".", 1)[1]


@dataclass(frozen=True)
class AgentRecord:
    pod_id: str
    container: BoxRecord | None = None


def record_path(pod_state: Path) -> Path:
    return pod_state / "vmimage" / FILE_NAME


# -- writing -------------------------------------------------------------------------


def encode(rec: AgentRecord) -> dict[str, Any]:
    b = rec.container
    box: dict[str, Any] | None = None
    if b is not None:
        box = {
            "cid": b.cid, "state": b.state.value, "base": b.base, "disk_name": b.disk_name,
            "user": b.user, "firmware": b.firmware, "created_at_ns": b.created_at_ns,
            "started_at_ns": b.started_at_ns,
            "finished_at_ns": b.finished_at_ns, "exit_code": b.exit_code, "reason": b.reason,
            "message": b.message[:MAX_MESSAGE], "domain_uuid": b.domain_uuid,
            "pin": None if b.pin is None else {"type": b.pin.key_type, "sha256": b.pin.sha256},
            "console": {"offset": b.mark.offset, "log_size": b.mark.log_size},
        }  # fmt: skip
    return {"pod_id": rec.pod_id, "container": box}


def write(path: Path, rec: AgentRecord) -> None:
    """Atomically (blocking)."""
    write_record(path, KIND, VERSION, encode(rec))


def remove(path: Path) -> None:
    """Gone with the pod's VM (blocking)."""
    path.unlink(missing_ok=True)


# -- reading -------------------------------------------------------------------------


def read(path: Path, pod_id: str) -> AgentRecord:
    """The record of pod ``pod_id``, checked (blocking); :class:`RecordInvalid` if it is
    missing or cannot be trusted."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise RecordInvalid(f"{path}: no record") from None
    except OSError as e:
        why = "a symlink" if e.errno == errno.ELOOP else e.strerror
        raise RecordInvalid(f"{path}: cannot open: {why}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RecordInvalid(f"{path}: not a regular file")
        chunks: list[bytes] = []
        left = MAX_RECORD_BYTES + 1
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise RecordInvalid(f"{path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > MAX_RECORD_BYTES:
        raise RecordInvalid(f"{path}: larger than {MAX_RECORD_BYTES} bytes")
    return parse(raw, pod_id, str(path))


def parse(raw: bytes, pod_id: str, where: str = "vm-image agent record") -> AgentRecord:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise RecordInvalid(f"{where}: not JSON: {e}") from None
    try:
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            raise ValueError(f"not a {KIND} record")
        version = doc.get("version")
        if type(version) is not int or not 1 <= version <= VERSION:
            raise ValueError(f"version {version!r} is not one this criv reads (1..{VERSION})")
        return decode(_obj(doc.get("data"), "data"), pod_id)
    except (ValueError, TypeError) as e:
        raise RecordInvalid(f"{where}: {e}") from None


def decode(d: dict[str, Any], pod_id: str) -> AgentRecord:
    if d.get("pod_id") != pod_id:
        raise ValueError(f"pod_id {str(d.get('pod_id'))[:80]!r} is not this pod's")
    box = d.get("container")
    return AgentRecord(pod_id, None if box is None else _box(_obj(box, "container")))


def _box(d: dict[str, Any]) -> BoxRecord:
    state = BoxState(_str(d, "state", re.compile("[a-z]{1,16}")))
    base = _str(d, "base", _BASE)
    disk_name = _str(d, "disk_name", max_len=255)
    if "/" in disk_name or "\0" in disk_name or disk_name in (".", ".."):
        raise ValueError(f"disk_name {disk_name[:80]!r} is not a file name")
    b = BoxRecord(
        cid=_str(d, "cid", _ID), state=state, base=base, disk_name=disk_name,
        user=_str(d, "user", _USER), firmware=_firmware(d),
        created_at_ns=_int(d, "created_at_ns", MAX_NS),
        started_at_ns=_int(d, "started_at_ns", MAX_NS),
        finished_at_ns=_int(d, "finished_at_ns", MAX_NS),
        exit_code=_int(d, "exit_code", 255), reason=_str(d, "reason", _REASON),
        message=_str(d, "message", max_len=MAX_MESSAGE),
        domain_uuid=_str(d, "domain_uuid", _UUID, empty=True), pin=_pin(d.get("pin")),
        mark=_mark(_obj(d.get("console"), "console")),
    )  # fmt: skip
    if b.state in VM_STATES and not (b.started_at_ns and b.domain_uuid):
        raise ValueError(f"a {b.state.value} container with no start time or domain")
    return b


def _pin(v: Any) -> HostKeyPin | None:
    if v is None:
        return None
    from criv.vmimage.sshkeys import KEY_TYPES, HostKeyPin

    d = _obj(v, "pin")
    kind = _str(d, "type", max_len=32)
    if kind not in KEY_TYPES:
        raise ValueError(f"pin: unknown key type {kind!r}")
    return HostKeyPin(kind, _str(d, "sha256", _FINGERPRINT))


def _firmware(d: dict[str, Any]) -> Firmware:
    v = d.get("firmware", "bios")  # version 1 had only SeaBIOS
    if v not in ("bios", "uefi"):
        raise ValueError(f"firmware {str(v)[:40]!r} is not bios or uefi")
    return "uefi" if v == "uefi" else "bios"


def _mark(d: dict[str, Any]) -> ConsoleMark:
    return ConsoleMark(_int(d, "offset", MAX_OFFSET), _int(d, "log_size", MAX_OFFSET))


def _obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError(f"{what} is not an object")
    return v


def _int(d: dict[str, Any], key: str, hi: int) -> int:
    v = d.get(key)
    if type(v) is not int or not 0 <= v <= hi:  # bool is not an int here
        raise ValueError(f"{key} {str(v)[:40]!r} is not an integer in 0..{hi}")
    return v


def _str(
    d: dict[str, Any],
    key: str,
    pattern: re.Pattern[str] | None = None,
    *,
    max_len: int = 4096,
    empty: bool = False,
) -> str:
    v = d.get(key)
    if not isinstance(v, str) or len(v) > max_len:
        raise ValueError(f"{key} is not a string of at most {max_len} characters")
    if pattern is not None and not (empty and v == "") and not pattern.fullmatch(v):
        raise ValueError(f"{key} {v[:80]!r} is malformed")
    return v
