"""Guest root in a clone against its template and the other clones (docs/security.md,
What remains: clones of one template share only its boot-time state).

Guest root in clone A writes a marker into its guest RAM (a file in the guest's tmpfs
root) and fills its memory; the template's saved RAM does not change, clone B started
after it does not see the marker, and B's kernel RNG gives other bytes than A's."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri

pytestmark = pytest.mark.vm

PRIVILEGED_POD = api_pb2.LinuxPodSandboxConfig(
    security_context=api_pb2.LinuxSandboxSecurityContext(privileged=True)
)
GUEST_ROOT = api_pb2.LinuxContainerSecurityContext(
    privileged=True, namespace_options=api_pb2.NamespaceOption(pid=api_pb2.NODE)
)
MARKER = "criv-clone-a-was-here-0123456789"


def _template(cri: Cri, pod: str) -> str:
    resp = cri.rt.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True), timeout=30
    )
    iso: dict[str, Any] = json.loads(resp.info["info"])["isolationState"]
    return str(iso["template"])


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _guest_root(cri: Cri, name: str) -> tuple[str, str]:
    pod = cri.run_pod(name, linux=PRIVILEGED_POD)
    return pod, cri.run(pod, "root", ["sleep", "3600"], security=GUEST_ROOT)


def _in_guest(cri: Cri, cid: str, script: str) -> str:
    r = cri.exec(cid, ["nsenter", "-t", "1", "-m", "--", "sh", "-c", script], timeout=60)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.stdout.decode()


@pytest.mark.timeout(900)
def test_a_clone_cannot_reach_its_template_or_the_next_clone(
    vm_cri_factory: Callable[..., Cri], tmp_path: Path
) -> None:
    tdir = tmp_path / "templates"
    cri = vm_cri_factory(vm={"template_dir": str(tdir)})
    cri.run_pod("cold")
    deadline = time.monotonic() + 300
    while not list(tdir.glob("[!.]*/meta.json")):
        assert time.monotonic() < deadline, "no template built"
        time.sleep(0.5)
    (template,) = [p.parent for p in tdir.glob("[!.]*/meta.json")]
    before = {f: _digest(template / f) for f in ("ram.bin", "state.bin")}

    pod_a, a = _guest_root(cri, "clone-a")
    assert _template(cri, pod_a) == template.name
    # guest root writes into its RAM: a marker file in the guest's own root, then 32 MiB
    _in_guest(cri, a, f"echo {MARKER} > /run/marker; head -c 33554432 /dev/urandom > /run/fill")
    rng_a = _in_guest(cri, a, "head -c 32 /dev/urandom | od -An -tx1")

    pod_b, b = _guest_root(cri, "clone-b")
    assert _template(cri, pod_b) == template.name
    assert _in_guest(cri, b, "cat /run/marker 2>/dev/null || echo none").strip() == "none"
    assert _in_guest(cri, b, "head -c 32 /dev/urandom | od -An -tx1") != rng_a
    # the template's files are as they were: no clone writes back into them
    assert {f: _digest(template / f) for f in ("ram.bin", "state.bin")} == before
    assert MARKER.encode() not in (template / "ram.bin").read_bytes()
