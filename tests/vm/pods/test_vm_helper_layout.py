"""Under TCG the agent's helpers run at fixed addresses (``--fixed-helper-layout``, the
agent's fixedlayout.py) and containers keep ASLR: crun sets the spec's
``linux.personality`` in the container's init and in every exec, which clears the flag
the agent passed down."""

from __future__ import annotations

import pytest

from tests.support.cri import Cri
from tests.support.vm import GUEST_ROOT, PRIVILEGED_POD

pytestmark = pytest.mark.vm

ADDR_NO_RANDOMIZE = 0x0040000


def _persona(cri: Cri, cid: str, cmd: str) -> int:
    r = cri.exec(cid, ["sh", "-c", cmd], timeout=60)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return int(r.stdout.decode().split()[0], 16)


def _persona_of(arg: str) -> str:
    """Shell, run from the guest's root: the persona of each guest process one of whose
    argv elements is ``arg``."""
    return (
        "nsenter -t 1 -m -- sh -c 'for p in /proc/[0-9]*; do "
        r'tr "\\0" "\\n" <$p/cmdline 2>/dev/null | grep -qx -- ' + arg
        + " && cat $p/personality; done; true'"
    )  # fmt: skip


@pytest.mark.timeout(600)
def test_helpers_run_without_aslr_under_tcg_and_containers_keep_it(vm_cri: Cri) -> None:
    cri = vm_cri
    pod = cri.run_pod("layout", linux=PRIVILEGED_POD)
    assert cri.isolation_state(pod)["accel"] == "tcg"
    plain = cri.run(pod, "plain", ["sleep", "3601"])
    root = cri.run(pod, "root", ["sleep", "3600"], security=GUEST_ROOT)

    assert _persona(cri, root, _persona_of("--fixed-helper-layout")) & ADDR_NO_RANDOMIZE
    # a container's init (its sleep) and an exec'd process: the default persona, ASLR on
    assert _persona(cri, root, _persona_of("3601")) == 0
    assert _persona(cri, plain, "cat /proc/self/personality") == 0
    assert cri.exec(plain, ["cat", "/proc/sys/kernel/randomize_va_space"]).stdout.strip() == b"2"
