"""The committed generated code must match proto/ (run `make proto` after editing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[3]
GENERATED = ROOT / "guest-agent" / "criv_agent" / "api"
REFERENCE = ROOT.parent / "shared" / "reference" / "cri-api-v0.36.3" / "api.proto"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "genproto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "guest-agent" / "criv_agent" / "api"
    produced = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert produced, "protoc produced nothing"
    stale = [
        str(rel)
        for rel in produced
        if not (GENERATED / rel).is_file()
        or (GENERATED / rel).read_bytes() != (fresh / rel).read_bytes()
    ]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def _descriptor_set(proto: Path, tmp: Path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp / f"{proto.parent.name}-{proto.stem}.pb"
    rc = protoc.main(["protoc", f"-I{proto.parent}", f"--descriptor_set_out={out}", str(proto)])
    assert rc == 0, f"protoc failed on {proto}"
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds


def test_cri_proto_matches_the_reference_contract(tmp_path: Path) -> None:
    """Same package, services, messages, enums, field numbers and types as cri-api."""
    assert REFERENCE.is_file(), f"reference contract missing: {REFERENCE}"
    ours = _descriptor_set(ROOT / "proto" / "runtime" / "v1" / "api.proto", tmp_path)
    theirs = _descriptor_set(REFERENCE, tmp_path)
    (a,) = ours.file
    (b,) = theirs.file
    for f in (a, b):
        f.ClearField("name")
        f.ClearField("source_code_info")
    assert a.package == "runtime.v1"
    assert a == b
