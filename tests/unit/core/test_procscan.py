"""procscan's /proc readers on real processes."""

from __future__ import annotations

import os
import subprocess
import sys

from criv.procscan import cpu_ns, process_start_time


def test_cpu_of_a_process_grows_and_a_gone_one_has_none() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.process_time()\n"
         "while time.process_time() - t < 0.3: pass\ninput()"],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        first = cpu_ns(child.pid)
        assert first is not None
        while (now := cpu_ns(child.pid)) is not None and now < first + 200_000_000:
            pass  # it spins 0.3 s of CPU, then waits
        assert now is not None and now >= first + 200_000_000
    finally:
        child.communicate(b"\n", timeout=10)
    assert cpu_ns(child.pid) is None
    assert process_start_time(os.getpid()) is not None
