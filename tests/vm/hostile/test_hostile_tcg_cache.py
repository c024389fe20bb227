"""Guest root against its QEMU's TCG translation cache (docs/security.md: what the guest
controls).

Under TCG a clone's cache is 128 MiB (criv/hypervisor/sizing.py: twice a cold VM's, so
that a vCPU hot-plug finds a free translation region). What QEMU translates is the
guest's choice: here guest root runs 32 MiB of fresh code in 8-byte blocks, each a
translated block of its own, several times what the cache holds, and keeps doing it
while the host hot-plugs a vCPU. What it gets:

- QEMU's translated code stays within the cache the host set (QEMU's own count,
  ``info jit``): the guest has no say in its size;
- at worst its own VM goes: QEMU 7.2 aborts a hot-plug when every region is taken, so
  the resize may fail or the pod go NOTREADY, but a neighbour pod answers, criv keeps
  serving, and the pod is removed with nothing left behind (the fixtures' leak checks).
"""

from __future__ import annotations

import re
import subprocess
import time

import grpc
import pytest

from criv_agent.api.runtime.v1 import api_pb2
from tests.support.cri import Cri
from tests.support.vm import GUEST_ROOT, PRIVILEGED_POD

pytestmark = pytest.mark.vm

CLONE_CACHE = 128 << 20  # criv/hypervisor/sizing.py: a clone's cache, 256 MiB pods

# 32 MiB of code: blocks of six nops and a jmp to the next (a translated block each),
# then ret; called ROUNDS times from fresh memory, so nothing is found translated
FILLER = """
import ctypes, mmap, sys
size = 32 << 20
for _ in range(int(sys.argv[1])):
    m = mmap.mmap(-1, size, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(b"\\x90" * 6 + b"\\xeb\\x00")
    m.seek(0)
    m.write(bytes(m[:8]) * (size // 8 - 1) + b"\\xc3" * 8)
    ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(m)))()
    print("round", flush=True)
"""


def _jit(domain: str) -> tuple[int, int, int]:
    """QEMU's translated code: (bytes used, bytes the cache holds, times it overflowed)."""
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "qemu-monitor-command", domain, "--hmp", "info jit"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    size = re.search(r"gen code size\s+(\d+)/(\d+)", out)
    flushes = re.search(r"TB flush count\s+(\d+)", out)
    assert size and flushes, out
    return int(size.group(1)), int(size.group(2)), int(flushes.group(1))


def _guest_python(cri: Cri, cid: str, rounds: int, background: bool = False) -> None:
    run = f"nsenter -t 1 -m -- python3 -c '{FILLER}' {rounds}"
    if background:
        run = f"({run}) >/dev/null 2>&1 &"
    r = cri.exec(cid, ["sh", "-c", run], timeout=600)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    if not background:
        assert r.stdout.decode().split().count("round") == rounds, r.stdout


@pytest.mark.timeout(900)
def test_guest_root_filling_the_translation_cache_hurts_only_its_pod(vm_cri: Cri) -> None:
    neighbour = vm_cri.run_pod("neighbour")
    ncid = vm_cri.run(neighbour, "idle", ["sleep", "3600"])
    pod = vm_cri.run_pod("translator", linux=PRIVILEGED_POD)
    iso = vm_cri.isolation_state(pod)
    if iso["accel"] != "tcg":
        pytest.skip("nothing is translated under KVM")
    assert iso["template"], "the pod is not a clone"
    assert (iso["vcpus"], iso["max_vcpus"]) == (1, 2), iso
    domain = str(iso["domain"])
    cid = vm_cri.run(pod, "root", ["sleep", "3600"], security=GUEST_ROOT)

    flushed = _jit(domain)[2]
    _guest_python(vm_cri, cid, rounds=2)
    used, holds, now_flushed = _jit(domain)
    assert now_flushed > flushed, "the guest's code did not fill the cache"
    assert holds <= CLONE_CACHE and used <= holds, (used, holds)

    # on again, with a vCPU hot-plugged meanwhile
    _guest_python(vm_cri, cid, rounds=3, background=True)
    time.sleep(2)
    res = api_pb2.LinuxContainerResources(cpu_period=100_000, cpu_quota=150_000)
    req = api_pb2.UpdatePodSandboxResourcesRequest(pod_sandbox_id=pod, resources=res)
    try:
        vm_cri.rt.UpdatePodSandboxResources(req, timeout=120)
        resized = True
    except grpc.RpcError as e:
        resized = False
        assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), e
    state = vm_cri.pod_status(pod).state
    if resized and state == api_pb2.SANDBOX_READY:
        assert vm_cri.isolation_state(pod)["vcpus"] == 2
        used, holds, _ = _jit(domain)
        assert holds <= CLONE_CACHE and used <= holds, (used, holds)

    r = vm_cri.exec(ncid, ["echo", "ok"], timeout=60)
    assert (r.exit_code, r.stdout) == (0, b"ok\n")
    vm_cri.rt.Status(api_pb2.StatusRequest(), timeout=30)
