"""`criv vm-image import FILE REF` against a real daemon: the containerDisk image lands in
the daemon's store, ListImages / ImageStatus show it at once, RemoveImage removes it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.daemon import CrivProcess
from tests.support.fixtures import TestRegistry
from tests.support.vmimagecli import vm_image_cli

pytestmark = pytest.mark.integration


def run_cli(c: CrivProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return vm_image_cli(c.config_path, "import", *args)


def test_import_shows_in_list_images(criv: CrivProcess, tmp_path: Path) -> None:
    disk = tmp_path / "base.qcow2"
    disk.write_bytes(b"QFI\xfb" + os.urandom(64 << 10))
    ref = "registry.example/vm/base:1"
    r = run_cli(criv, str(disk), ref)
    assert r.returncode == 0, r.stderr + criv.logs()
    assert ref in r.stdout and "/disk/base.qcow2" in r.stdout
    image_id = r.stdout.split()[1]
    listed = criv.images.ListImages(api_pb2.ListImagesRequest()).images
    assert [(i.id, list(i.repo_tags)) for i in listed] == [(image_id, [ref])]
    st = criv.images.ImageStatus(
        api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref))
    ).image
    assert st.id == image_id and st.size > 64 << 10
    # no scratch layout is left in the state dir
    assert not list(criv.state_dir.glob(".vm-image-import-*"))
    criv.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)))
    assert not criv.images.ListImages(api_pb2.ListImagesRequest()).images


def test_import_refusals(criv: CrivProcess, tmp_path: Path) -> None:
    r = run_cli(criv, str(tmp_path / "missing.qcow2"), "registry.example/vm/x:1")
    assert r.returncode == 1 and "no such file" in r.stderr
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 4096)
    r = run_cli(criv, str(disk), "Not A Ref")
    assert r.returncode == 1 and r.stderr.startswith("criv: ")
    r = run_cli(criv, str(disk), "registry.example/vm/x@sha256:" + "a" * 64)
    assert r.returncode == 1 and "not a digest" in r.stderr
    assert not criv.images.ListImages(api_pb2.ListImagesRequest()).images


def test_import_without_daemon_says_so(criv: CrivProcess, tmp_path: Path) -> None:
    criv.stop()
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 4096)
    r = run_cli(criv, str(disk), "registry.example/vm/x:1")
    assert r.returncode == 1 and "nothing serves" in r.stderr


def test_import_and_push(criv: CrivProcess, tmp_path: Path, registry: TestRegistry) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo not installed (make install)")
    disk = tmp_path / "pushed.qcow2"
    disk.write_bytes(b"QFI\xfb" + os.urandom(16 << 10))
    ref = registry.ref("vm/imported", "1")
    r = run_cli(criv, str(disk), ref, "--push", "--insecure", "--name", "root")
    assert r.returncode == 0, r.stderr + criv.logs()
    assert f"pushed {ref}" in r.stdout and "/disk/root.qcow2" in r.stdout
    image_id = r.stdout.split()[1]
    raw = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    manifest = json.loads(raw)
    assert manifest["config"]["digest"] == image_id  # the same image as the local one
