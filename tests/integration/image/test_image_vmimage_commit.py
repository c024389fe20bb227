"""`criv vm-image commit` refusals against a real daemon, no VM: an unknown container, bad
references, no daemon, and the admin RPC's scratch dir (the daemon writes only into an
empty ``.vm-image-*`` dir directly under its state dir). The loop itself, with a VM:
tests/vm/vmimage/test_vmimage_builder.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest

from criv.cri.admin import COMMIT_CONTAINER, RemoteError, call_daemon
from criv_agent.api.runtime.v1 import api_pb2
from tests.support.daemon import CrivProcess
from tests.support.vmimagecli import vm_image_cli

pytestmark = pytest.mark.integration

REF = "registry.example/vm/committed:1"


def run_cli(c: CrivProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return vm_image_cli(c.config_path, "commit", *args)


def test_commit_refusals(criv: CrivProcess, tmp_path: Path) -> None:
    r = run_cli(criv, "0" * 64, REF)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr, r.stderr
    r = run_cli(criv, "0" * 64, "Not A Ref")
    assert r.returncode == 1 and r.stderr.startswith("criv: "), r.stderr
    r = run_cli(criv, "0" * 64, "registry.example/vm/x@sha256:" + "a" * 64)
    assert r.returncode == 1 and "not a digest" in r.stderr, r.stderr
    assert not list(criv.state_dir.glob(".vm-image-*"))
    assert not criv.images.ListImages(api_pb2.ListImagesRequest()).images


@pytest.mark.parametrize("where", ["outside", "misnamed", "not-empty", "missing"])
def test_commit_scratch_dir_is_checked(criv: CrivProcess, tmp_path: Path, where: str) -> None:
    work = {
        "outside": tmp_path / ".vm-image-commit-x",
        "misnamed": criv.state_dir / "images-x",
        "not-empty": criv.state_dir / ".vm-image-commit-full",
        "missing": criv.state_dir / ".vm-image-commit-gone",
    }[where]
    if where != "missing":
        work.mkdir()
    if where == "not-empty":
        (work / "f").write_text("x")
    request = {"container": "0" * 64, "ref": REF, "workdir": str(work)}
    with pytest.raises(RemoteError) as e:
        call_daemon(criv.socket, COMMIT_CONTAINER, request, 30)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert "scratch dir" in str(e.value)


def test_commit_without_daemon_says_so(criv: CrivProcess) -> None:
    criv.stop()
    r = run_cli(criv, "0" * 64, REF)
    assert r.returncode == 1 and "nothing serves" in r.stderr
