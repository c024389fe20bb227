"""The operator commands and metrics with a vm pod: `criv pods` shows its VM (QEMU's pid,
found through libvirt's pid file for the recorded domain, and its memory), `criv inspect`
its domain XML, backend and console log, `criv console` the guest's console, and the
metrics endpoint the VM running and its vsock backend's traffic."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from criv.hypervisor.libvirtbase import qemu_pid
from tests.integration.ops.opstools import criv_cli, free_port, sample, scrape, table_row
from tests.support.cri import Cri

pytestmark = [pytest.mark.vm, pytest.mark.integration]


@pytest.mark.timeout(300)
def test_vm_pod_shows_its_vm(vm_cri_factory: Callable[..., Cri]) -> None:
    port = free_port()
    cri = vm_cri_factory(metrics={"address": f"127.0.0.1:{port}"})
    pod = cri.run_pod("vmops")
    cid = cri.run(pod, "app", ["sleep", "300"])
    assert cri.exec(cid, ["echo", "hi"]).stdout == b"hi\n"

    doc = json.loads(criv_cli(cri, "inspect", pod).stdout)
    domain = doc["info"]["isolationState"]["domain"]
    qemu = qemu_pid(domain)
    assert qemu > 0
    assert f"<name>{domain}</name>" in doc["domainXml"]
    roles = {p["role"]: p for p in doc["processes"]}
    assert roles["qemu"]["pid"] == qemu and roles["qemu"]["rssKiB"] > 10 * 1024
    assert roles["vsock-backend"]["pid"] == doc["info"]["isolationState"]["backend_pid"]
    assert Path(doc["paths"]["consoleLog"]).is_file()
    assert Path(doc["paths"]["vsockStatus"]).is_file()

    ip = cri.pod_status(pod).network.ip
    out = criv_cli(cri, "pods").stdout
    print(f"$ criv pods\n{out}")  # shown with pytest -s: what an operator sees
    row = table_row(out, pod[:13])
    assert row[1:7] == ["vmops", "default", "vm", "ready", ip, str(qemu)]  # the VM's pid
    assert row[7].endswith("Mi"), row  # the VM's RSS: tens of MiB at least
    out = criv_cli(cri, "containers").stdout
    print(f"$ criv containers\n{out}")
    row = table_row(out, cid[:13])
    assert row[1:8] == ["app", "vmops", "default", "vm", "running", ip, str(qemu)]

    console = criv_cli(cri, "console", pod, "--no-follow", "-n", "1000").stdout
    # a cold VM's console has its boot; a clone's starts where its template's stopped:
    # with the agent taking the pod's identity
    cloned = bool(doc["info"]["isolationState"]["template"])
    want = "took the pod's identity" if cloned else "criv-init: starting criv-agent"
    assert want in console, console

    # the backend refreshes its status file every 5 s: wait for the exec's bytes
    deadline = time.monotonic() + 30
    while True:
        _, s = scrape(port)
        who = {"sandbox": pod[:12], "pod": "vmops", "namespace": "default"}
        to_guest = sample(s, "criv_vsock_backend_bytes_total", direction="to_guest", **who)
        from_guest = sample(s, "criv_vsock_backend_bytes_total", direction="from_guest", **who)
        if (to_guest and from_guest) or time.monotonic() > deadline:
            break
        time.sleep(1)
    print("$ curl .../metrics | grep ^criv_  (excerpt)")
    for name in sorted(s):
        if name.startswith("criv_") and not name.endswith("_bucket"):
            for labels, v in s[name].items():
                print(f"{name}{dict(labels)} {v}")
    assert to_guest > 0 and from_guest > 0
    assert sample(s, "criv_vsock_backend_connections_total", **who) > 0
    assert sample(s, "criv_sandboxes_running", mode="vm") == 1
    start = "template" if cloned else "cold"
    assert sample(s, "criv_pod_start_duration_seconds_count", mode="vm", start=start) == 1
    assert sample(s, "criv_template_hits_total") == (1 if cloned else 0)
    assert sample(s, "criv_startup_sweeps_total", sweeper="vm", result="ok") == 1

    r = criv_cli(cri, "debug", pod, check=False)
    assert r.returncode == 1 and "host-mode pods only" in r.stderr
    r = criv_cli(cri, "console", pod, "--rw", check=False)
    assert r.returncode == 1 and "--rw is not supported" in r.stderr
