"""Guest root in a clone against its template and the other clones (docs/security.md,
What remains: clones of one template share only its boot-time state).

Guest root in clone A writes a marker into its guest RAM (a file in the guest's tmpfs
root) and fills its memory; the template's saved RAM does not change, clone B started
after it does not see the marker, and B's kernel RNG gives other bytes than A's."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cri import Cri
from tests.support.vm import GUEST_ROOT, PRIVILEGED_POD, wait_template

pytestmark = pytest.mark.vm

MARKER = "criv-clone-a-was-here-0123456789"


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
    template = wait_template(tdir)
    before = {f: _digest(template / f) for f in ("ram.bin", "state.bin")}

    pod_a, a = _guest_root(cri, "clone-a")
    assert cri.isolation_state(pod_a)["template"] == template.name
    # guest root writes into its RAM: a marker file in the guest's own root, then 32 MiB
    _in_guest(cri, a, f"echo {MARKER} > /run/marker; head -c 33554432 /dev/urandom > /run/fill")
    rng_a = _in_guest(cri, a, "head -c 32 /dev/urandom | od -An -tx1")

    pod_b, b = _guest_root(cri, "clone-b")
    assert cri.isolation_state(pod_b)["template"] == template.name
    assert _in_guest(cri, b, "cat /run/marker 2>/dev/null || echo none").strip() == "none"
    assert _in_guest(cri, b, "head -c 32 /dev/urandom | od -An -tx1") != rng_a
    # the template's files are as they were: no clone writes back into them
    assert {f: _digest(template / f) for f in ("ram.bin", "state.bin")} == before
    assert MARKER.encode() not in (template / "ram.bin").read_bytes()
