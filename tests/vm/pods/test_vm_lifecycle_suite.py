"""The runtime suite's lifecycle tests, in both isolation modes (``any_cri``: host, vm).

Under TCG on two cores a VM boot costs seconds, so the vm half runs a representative
subset: the whole pod + container lifecycle, CRI logs (partial lines, reopen), ExecSync
exit codes / deadline / output cap, OOMKilled and stop timeouts, and a criv restart while
the pod runs. The host half of each is the same function the integration suite runs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.runtime import test_runtime_exec_logs as exec_logs
from tests.integration.runtime import test_runtime_lifecycle as lifecycle
from tests.integration.runtime import test_runtime_recovery as recovery
from tests.support.cri import Cri

pytestmark = pytest.mark.vm

CASES: dict[str, Callable[[Cri], None]] = {
    "lifecycle": lifecycle.test_pod_and_container_lifecycle,
    "exec_sync": exec_logs.test_exec_sync_codes_deadline_and_cap,
    "logs": exec_logs.test_log_format_partial_lines_and_reopen,
    "oom_and_stop_timeout": exec_logs.test_oom_killed_and_stop_timeout,
    "criv_restart": recovery.test_restart_keeps_states_exit_codes_and_logs,
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(CASES))
def test_lifecycle_in_both_modes(any_cri: Cri, case: str) -> None:
    CASES[case](any_cri)
