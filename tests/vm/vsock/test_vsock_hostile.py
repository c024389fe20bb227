"""A guest that ignores the vsock credit criv's backend gave it (docs/security.md).

The test VM loads ``criv_overrun.ko`` (tests/vm/vsock/guest/overrun/), a guest kernel
module through which guest root makes the kernel believe the host granted ~2 GiB of
credit on a connection; the guest program then sends 256 MiB on a connection whose host
side never reads. The assertions are on the host: the backend resets that connection and
counts the overrun, its memory stays bounded, and it goes on serving."""

from __future__ import annotations

import json
import time

import pytest

from tests.vm.vsock.vsockvm import VM, wait_for_log

pytestmark = pytest.mark.vm

MiB = 1 << 20
SENT = 256 * MiB


@pytest.mark.timeout(180)
def test_a_guest_overrunning_its_credit_is_reset(vm: VM) -> None:
    start = (vm.dir / "backend.log").stat().st_size
    rss_before = vm.backend.rss_kib()
    assert rss_before is not None
    s = vm.connect(f"OVERRUN {SENT}", timeout=60)  # and never read from it
    line = wait_for_log(vm, start, b"beyond the credit it was given", timeout=120)
    assert b"resetting" in line, line
    rss_after = vm.backend.rss_kib()
    assert rss_after is not None and rss_after - rss_before < 32 * 1024, (rss_before, rss_after)

    # the guest saw its connection reset long before it could send what it meant to
    deadline = time.monotonic() + 60
    result = b""
    while not result.startswith(b"OVERRUN"):
        assert time.monotonic() < deadline, f"no result from the guest: {vm.logs()}"
        time.sleep(0.5)
        r = vm.connect("RESULT", timeout=10)
        result = r.recv(200)
        r.close()
    fields = result.split()
    sent, err = int(fields[2]), int(fields[4])
    assert err != 0 and sent < SENT, result

    # the host side of the reset connection ends; reading it drains a bounded amount
    s.settimeout(30)
    got = 0
    try:
        while chunk := s.recv(MiB):
            got += len(chunk)
    except ConnectionResetError:
        pass
    s.close()
    assert got < 64 * MiB, got
    deadline = time.monotonic() + 30  # the status file is rewritten every few seconds
    while json.loads((vm.dir / "status.json").read_text())["credit_overruns"] < 1:
        assert time.monotonic() < deadline, "the overrun was not counted"
        time.sleep(0.5)
    assert vm.answers(), "the backend stopped serving after the overrun"
