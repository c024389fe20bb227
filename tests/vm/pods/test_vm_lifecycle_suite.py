"""The runtime suite's lifecycle scenarios, in both isolation modes (``any_cri``: host, vm).

Under TCG on two cores a VM boot costs seconds, so the vm half runs a representative
subset: the whole pod + container lifecycle, CRI logs (partial lines, reopen), ExecSync
exit codes / deadline / output cap, OOMKilled and stop timeouts, and a criv restart while
the pod runs. Each case is a function of tests/support/scenarios.py, the same one the
integration suite (tests/integration/runtime) runs in host mode.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support import scenarios
from tests.support.cri import Cri

pytestmark = pytest.mark.vm

CASES: dict[str, Callable[[Cri], None]] = {
    "lifecycle": scenarios.pod_and_container_lifecycle,
    "exec_sync": scenarios.exec_sync_codes_deadline_and_cap,
    "logs": scenarios.log_format_partial_lines_and_reopen,
    "oom_and_stop_timeout": scenarios.oom_killed_and_stop_timeout,
    "criv_restart": scenarios.restart_keeps_states_exit_codes_and_logs,
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(CASES))
def test_lifecycle_in_both_modes(any_cri: Cri, case: str) -> None:
    CASES[case](any_cri)
